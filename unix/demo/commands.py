"""`unix demo`: serve the Gradio page (extra `demo`: pip install 'unix[demo]')."""

from __future__ import annotations

from unix.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="a web page to write reports and draw X-rays (Gradio; localhost by default)")
    p.add_argument("--weights", help="weights folder (default: the embedded phantom-tiny demo model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait for the model (default 16)")
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("unix demo needs gradio: pip install 'unix[demo]' (or UNIX_EXTRAS=dev,eval,demo bash install.sh)") from None
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a port number")
    if args.queue_size < 1:
        raise UserError("--queue-size must be at least 1")
    from unix.demo.app import build_app
    from unix.infer import load_pipeline

    pipe = load_pipeline(args.weights, args.device, args.dtype)
    app = build_app(pipe)
    # one request at a time on the one model; the others wait in the queue
    app.queue(default_concurrency_limit=1, max_size=args.queue_size)
    print(f"unix demo: http://{args.host}:{args.port} (weights {pipe.folder}); Ctrl-C stops it", flush=True)
    app.launch(server_name=args.host, server_port=args.port, show_error=True, quiet=True)
    return 0
