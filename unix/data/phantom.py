"""CXR-Phantom: procedural frontal chest radiographs with exact CheXpert labels and short reports.

One image = one `Case`: an `Anatomy` (body, lungs, heart, mediastinum, spine, ribs, clavicles, domes,
exposure, noise; all varied per image) plus a tuple of `Finding`s (what is drawn and reported) and the
labels the report explicitly negates. `draw(anatomy, findings, size)` is a pure function of its
arguments, so a test can draw the same anatomy with and without a finding. `generate(seed, index)`
samples case `index` from `numpy.random.default_rng([seed, index])`: any subset regenerates identically.
Held-out images (`split="val"` or `"test"`) come from `default_rng([seed, index, k])` (k = 1, 2): a
stream no training image is drawn from, so a test split never holds an image that a model trained on
any number of images of the same seed saw (the shipped demo model: seed 0, train indices 0-7999).

Geometry is in normalised units: u is horizontal from the body midline (u < 0 is image left =
patient RIGHT, the PA convention), v is vertical from the top (0) to the bottom (1) of a standard
frame. The picture is an attenuation map A (0 = air outside the body) drawn at half resolution,
upsampled, then exposed as 1 - exp(-gain * A) with quantum noise.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from unix.data.phantom_report import write_report

from unix.eval.chexpert import CHEXPERT_FINDINGS

LABELS: tuple[str, ...] = CHEXPERT_FINDINGS
PATHOLOGIES = tuple(name for name in LABELS if name not in ("No Finding", "Support Devices"))
DEVICE_KINDS = ("endotracheal tube", "enteric tube", "central line", "pacemaker")
NORMAL_FRACTION = 0.30  # the issue asks for roughly 30% No Finding
DEVICE_FRACTION = 0.20  # images with at least one support device (normal or not)
HEDGE_FRACTION = 0.12  # pathologies reported with a hedge ("possible ...") -> label -1
HEDGED_STRENGTH = 0.6  # hedged findings are drawn fainter: they are the equivocal ones
# Relative frequency of each pathology among abnormal images (several per image).
PATHOLOGY_WEIGHTS = {
    "Enlarged Cardiomediastinum": 0.5, "Cardiomegaly": 1.2, "Lung Opacity": 1.0, "Lung Lesion": 0.6,
    "Edema": 0.8, "Consolidation": 0.8, "Pneumonia": 0.7, "Atelectasis": 1.0, "Pneumothorax": 0.6,
    "Pleural Effusion": 1.3, "Pleural Other": 0.35, "Fracture": 0.45,
}
N_PATHOLOGIES = {1: 0.30, 2: 0.35, 3: 0.25, 4: 0.10}  # pathologies per abnormal image
CM_PER_UNIT = 42.0  # a normalised unit is ~42 cm: the widest rib cage (~0.72 units) is ~30 cm
CTR_BY_SEVERITY = {"mild": 0.55, "moderate": 0.60, "severe": 0.67}  # cardiothoracic ratio drawn
NOISE_BANK, NOISE_SEED = 1 << 21, 20261122  # shared pixel-noise array (2M values) and its seed
LUT_LEVELS = 1024  # intensity levels before the gamma lookup table
ZONE_V = {"upper": 0.27, "middle": 0.42, "lower": 0.56}  # v of a lung zone's centre


@dataclass(frozen=True)
class Finding:
    """One drawn and reported finding. Sides are the PATIENT's (right = image left)."""

    label: str  # a CheXpert observation in PATHOLOGIES or "Support Devices"
    status: int = 1  # 1 reported as present, -1 reported with a hedge (drawn fainter)
    side: str | None = None  # right | left | bilateral
    severity: str | None = None  # small|moderate|large (effusion, pneumothorax) or mild|moderate|severe
    zone: str | None = None  # upper | middle | lower lung zone; apical for pleural thickening
    kind: str | None = None  # nodule|mass, thickening|plaques, acute|healed, a DEVICE_KINDS entry
    size_cm: float | None = None  # lung lesion diameter
    rib: int | None = None  # fractured posterior rib, 4..9
    seed: int = 0  # shape details (blob lobes, band positions); same seed -> same drawing


@dataclass(frozen=True)
class Anatomy:
    """Per-image anatomy and exposure; all lengths in normalised units (see module docstring)."""

    cx: float  # body midline (image x)
    cy: float  # vertical shift of the thorax
    scale: float  # overall body size
    tilt: float  # shear of the midline per unit height (slight rotation)
    cage_hw: float  # half width of the rib cage at its widest
    soft_margin: float  # soft tissue outside the ribs
    apex: float  # v of the lung apices
    dome_right: float  # v of the right costophrenic angle (the right dome sits higher)
    dome_left: float
    dome_height: float  # rise of each dome above its costophrenic angle
    ctr: float  # cardiothoracic ratio (normal < 0.5)
    heart_v: float  # v of the heart centre
    mediastinum_hw: float  # half width of the upper mediastinum
    rib_first: float  # v of the first posterior rib
    rib_gap: float  # spacing of the upper posterior ribs
    clavicle_v: float  # v of the medial ends of the clavicles
    air: float  # lung aeration (how dark the lungs are)
    bone: float  # bone density
    gain: float  # exposure: A -> 1 - exp(-gain A)
    gamma: float  # display gamma
    noise: float  # quantum noise amplitude
    texture_seed: int  # vessel markings, mottle and pixel noise


@dataclass(frozen=True)
class Case:
    anatomy: Anatomy
    findings: tuple[Finding, ...]
    negated: tuple[str, ...]  # absent labels the report may negate ("No pneumothorax."), if they fit


@dataclass
class PhantomSample:
    id: str
    index: int
    image: np.ndarray  # (size, size) uint8
    report: str
    labels: dict[str, float]  # CheXpert: 1, 0, -1, NaN = not mentioned
    attributes: dict  # findings, negated labels, anatomy, cardiothoracic ratio


# --------------------------------------------------------------------------- sampling

def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    r = rng.uniform
    dome_right = r(0.66, 0.72)
    return Anatomy(
        cx=r(0.47, 0.53), cy=r(-0.03, 0.03), scale=r(0.90, 1.05), tilt=r(-0.03, 0.03),
        cage_hw=r(0.34, 0.39), soft_margin=r(0.03, 0.08), apex=r(0.11, 0.15),
        dome_right=dome_right, dome_left=dome_right + r(0.01, 0.04), dome_height=r(0.06, 0.09),
        ctr=r(0.38, 0.48), heart_v=r(0.55, 0.59), mediastinum_hw=r(0.045, 0.06),
        rib_first=r(0.10, 0.13), rib_gap=r(0.048, 0.056), clavicle_v=r(0.12, 0.16),
        air=r(0.50, 0.58), bone=r(0.85, 1.15), gain=r(1.8, 2.6), gamma=r(0.8, 1.25), noise=r(0.01, 0.03),
        texture_seed=int(rng.integers(2**31)),
    )


def _pathology(label: str, rng: np.random.Generator, status: int) -> Finding:
    side = str(rng.choice(["right", "left"]))
    seed = int(rng.integers(2**31))
    f = Finding(label, status=status, seed=seed)
    if label in ("Cardiomegaly", "Edema"):
        severity = str(rng.choice(["mild", "moderate", "severe"], p=[0.45, 0.4, 0.15]))
        return replace(f, severity=severity, side="bilateral" if label == "Edema" else None)
    if label == "Enlarged Cardiomediastinum":
        return replace(f, severity=str(rng.choice(["mild", "moderate"])))
    if label in ("Pleural Effusion", "Atelectasis"):
        side = str(rng.choice(["right", "left", "bilateral"], p=[0.35, 0.3, 0.35]))
        sev = ["small", "moderate", "large"] if label == "Pleural Effusion" else ["mild", "moderate"]
        return replace(f, side=side, severity=str(rng.choice(sev)), zone="lower")
    if label == "Pneumothorax":
        return replace(f, side=side, severity=str(rng.choice(["small", "moderate", "large"], p=[0.5, 0.3, 0.2])))
    if label in ("Consolidation", "Lung Opacity", "Pneumonia"):
        zone = str(rng.choice(["upper", "middle", "lower"], p=[0.25, 0.3, 0.45]))
        return replace(f, side=side, zone=zone)
    if label == "Lung Lesion":
        size = float(np.round(rng.uniform(1.0, 6.0), 1))
        zone = str(rng.choice(["upper", "middle", "lower"], p=[0.45, 0.35, 0.2]))
        return replace(f, side=side, zone=zone, size_cm=size, kind="mass" if size >= 3.0 else "nodule")
    if label == "Pleural Other":
        kind = str(rng.choice(["thickening", "plaques"]))
        zone = "apical" if kind == "thickening" and rng.random() < 0.5 else None
        return replace(f, side=side, kind=kind, zone=zone)
    if label == "Fracture":
        return replace(f, side=side, rib=int(rng.integers(4, 10)), kind=str(rng.choice(["acute", "healed"])))
    raise ValueError(f"not a pathology: {label!r}")


def sample_case_findings(rng: np.random.Generator) -> tuple[tuple[Finding, ...], tuple[str, ...]]:
    """Findings of one image and the absent labels its report will negate."""
    findings: list[Finding] = []
    if rng.random() >= NORMAL_FRACTION:
        n = int(rng.choice(list(N_PATHOLOGIES), p=list(N_PATHOLOGIES.values())))
        weights = np.array([PATHOLOGY_WEIGHTS[k] for k in PATHOLOGIES])
        for label in rng.choice(PATHOLOGIES, size=n, replace=False, p=weights / weights.sum()):
            status = -1 if rng.random() < HEDGE_FRACTION else 1
            f = _pathology(str(label), rng, status)
            if status == -1 and f.severity:  # an equivocal finding is a small one
                f = replace(f, severity="small" if f.label in ("Pleural Effusion", "Pneumothorax") else "mild")
            findings.append(f)
            if f.label == "Pneumonia":  # pneumonia is read from an airspace opacity: draw and report one
                companion = "Consolidation" if rng.random() < 0.6 else "Lung Opacity"
                findings.append(replace(f, label=companion, status=1))
    if rng.random() < DEVICE_FRACTION:
        n_dev = 1 + int(rng.random() < 0.4)
        for kind in rng.choice(DEVICE_KINDS, size=n_dev, replace=False):
            findings.append(Finding("Support Devices", side="left" if kind == "pacemaker" else None,
                                    kind=str(kind), seed=int(rng.integers(2**31))))
    present = {f.label for f in findings}
    candidates = [x for x in ("Pneumothorax", "Pleural Effusion", "Consolidation", "Edema", "Cardiomegaly",
                              "Enlarged Cardiomediastinum", "Pneumonia", "Lung Opacity", "Fracture")
                  if x not in present]
    if present & {"Consolidation", "Lung Opacity", "Pneumonia", "Edema"}:  # keep negatives plausible
        candidates = [x for x in candidates if x not in ("Consolidation", "Lung Opacity", "Pneumonia")]
    n_neg = int(rng.integers(2, 5)) if not present - {"Support Devices"} else int(rng.integers(0, 3))
    order = rng.permutation(len(candidates))[:n_neg]
    negated = tuple(sorted((candidates[i] for i in order), key=LABELS.index))
    return tuple(findings), negated


def labels_of(findings: tuple[Finding, ...], negated: tuple[str, ...]) -> dict[str, float]:
    """CheXpert labels: 1 present, -1 hedged, 0 negated, NaN not mentioned; No Finding is 1 only when no
    pathology (anything but Support Devices) is present or hedged, else NaN."""
    labels = {name: float("nan") for name in LABELS}
    for name in negated:
        labels[name] = 0.0
    for f in sorted(findings, key=lambda f: -f.status):  # a positive mention outranks a hedged one
        if np.isnan(labels[f.label]) or labels[f.label] == 0.0:
            labels[f.label] = float(f.status)
    if not any(f.label != "Support Devices" for f in findings):
        labels["No Finding"] = 1.0
    return labels


HELD_OUT_STREAMS = {"val": 1, "test": 2}  # third seed word of held-out images; training images have none


def sample_case(seed: int, index: int, split: str = "train") -> tuple[Case, np.random.Generator]:
    if split != "train" and split not in HELD_OUT_STREAMS:
        raise ValueError(f"split must be train, val or test, got {split!r}")
    rng = np.random.default_rng([seed, index] if split == "train" else [seed, index, HELD_OUT_STREAMS[split]])
    anatomy = sample_anatomy(rng)
    findings, negated = sample_case_findings(rng)
    return Case(anatomy, findings, negated), rng


def generate(seed: int, index: int, size: int = 256, split: str = "train") -> PhantomSample:
    """Image `index` of the data set with this seed: anatomy, findings, picture, report, labels.
    `split` "val" or "test" draws it from that held-out stream instead (id `phantom-SEED-SPLIT-INDEX`)."""
    check_size(size)
    case, rng = sample_case(seed, index, split)
    image = draw(case.anatomy, case.findings, size)
    report, negated = write_report(case.findings, case.negated, rng)
    attributes = {
        "findings": [{k: v for k, v in asdict(f).items() if v is not None and k != "seed"} for f in case.findings],
        "negated": list(negated),
        "ctr": round(heart_ctr(case.anatomy, case.findings), 3),
        "anatomy": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(case.anatomy).items()},
    }
    name = f"phantom-{seed}-{index:07d}" if split == "train" else f"phantom-{seed}-{split}-{index:07d}"
    return PhantomSample(name, index, image, report, labels_of(case.findings, negated), attributes)


def check_size(size: int) -> None:
    if size < 32 or size % 16:
        raise ValueError(f"image size must be a multiple of 16 and at least 32, got {size}")


def split_of(index: int, n: int, fractions: tuple[float, float, float]) -> str:
    """train / val / test by index fraction: the first fractions[0] of the indices are train, and so on."""
    train_end = round(n * fractions[0])
    val_end = round(n * (fractions[0] + fractions[1]))
    return "train" if index < train_end else "val" if index < val_end else "test"


def encode_png(image: np.ndarray) -> bytes:
    """8-bit grayscale PNG with the "up" filter on every row and zlib level 1: the same size as Pillow's
    adaptive filtering at half the time (PNG encoding is a third of the cost of an image otherwise)."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} {image.shape}")
    h, w = image.shape
    rows = np.empty((h, w + 1), np.uint8)
    rows[:, 0] = 2  # filter type 2 (up): each row minus the row above, mod 256
    rows[0, 0], rows[0, 1:] = 0, image[0]
    np.subtract(image[1:], image[:-1], out=rows[1:, 1:])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit, grayscale, deflate, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) + chunk(b"IEND", b"")


def heart_ctr(anatomy: Anatomy, findings: tuple[Finding, ...]) -> float:
    for f in findings:
        if f.label == "Cardiomegaly":
            ctr = CTR_BY_SEVERITY[f.severity or "mild"]
            return ctr if f.status == 1 else 0.52  # hedged: borderline
    return anatomy.ctr


# --------------------------------------------------------------------------- drawing

def _ramp(x, width: float):
    """Soft step: 0 below -width/2, 1 above width/2 (anti-aliased edges)."""
    return np.clip(x * (1.0 / width) + 0.5, 0.0, 1.0)


@lru_cache(maxsize=8)
def _centres(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float32) + 0.5) / n


def _coords(a: Anatomy, n: int) -> tuple[np.ndarray, np.ndarray]:
    """u (n, n) from the body midline and v (n, 1), which depends on the row only."""
    c = _centres(n)
    v = ((c - 0.5 - a.cy) / a.scale + 0.5)[:, None]
    u = (c[None, :] - a.cx - a.tilt * (c[:, None] - 0.5)) / a.scale
    return u, v


class _Frame:
    """Coordinate fields of one anatomy at the working resolution n (shared by all drawing steps)."""

    def __init__(self, a: Anatomy, n: int):
        self.a, self.n = a, n
        self.e = 1.5 / (n * a.scale)  # edge softness: 1.5 working pixels
        self.u, self.v = _coords(a, n)
        self.au = np.abs(self.u)
        self.right = _ramp(-self.u, self.e)  # patient right = image left
        self.left = 1.0 - self.right
        v = self.v
        self.lw = a.cage_hw * (1.0 - 0.75 * np.exp(-np.maximum(v - a.apex, 0.0) / 0.1))  # widest at the base
        self.dome_base = a.dome_right * self.right + a.dome_left * self.left
        bump = np.clip(1.0 - ((self.au - 0.45 * a.cage_hw) / (0.6 * a.cage_hw)) ** 2, 0.0, 1.0)
        self.dome = self.dome_base - a.dome_height * bump
        self.lung = _ramp(self.lw - self.au, self.e) * _ramp(self.au - 0.015, self.e)
        apex = a.apex + 0.6 * ((self.au - 0.45 * a.cage_hw) / a.cage_hw) ** 2  # rounded apices
        self.lung *= _ramp(v - apex, self.e) * _ramp(self.dome - v, self.e)

    def side(self, side: str | None):
        return {"right": self.right, "left": self.left}.get(side, 1.0)

    def to_pixels(self, points) -> list[tuple[float, float]]:
        """(u, v) anatomy points -> working-resolution pixel coordinates (x, y)."""
        a, out = self.a, []
        for u, v in points:
            y = (v - 0.5) * a.scale + 0.5 + a.cy
            x = a.cx + a.tilt * (y - 0.5) + u * a.scale
            out.append((x * self.n - 0.5, y * self.n - 0.5))
        return out

    def blob(self, f: Finding, radius: float, rng: np.random.Generator, lobes: int = 3):
        """An airspace blob of `lobes` Gaussian lobes (more lobes: patchier) in f's side and zone,
        confined to that lung."""
        total = 0.0
        # Python floats throughout: a NumPy float64 scalar would promote the float32 fields to float64.
        u0 = (0.62 + 0.12 * float(rng.uniform(-1, 1))) * self.a.cage_hw  # lateral to the heart border
        v0 = ZONE_V[f.zone or "lower"] + 0.03 * float(rng.uniform(-1, 1))
        for _ in range(lobes):
            du, dv = rng.normal(0, (0.4 if lobes <= 3 else 0.6) * radius, 2).tolist()
            r = radius * float(rng.uniform(0.6, 1.0) if lobes <= 3 else rng.uniform(0.4, 0.65))
            total = total + np.exp(-((self.au - u0 - du) ** 2 + (self.v - v0 - dv) ** 2) / (r * r))
        return np.clip((1.5 if lobes <= 3 else 0.8) * total, 0.0, 1.0) * self.lung * self.side(f.side)


def _sides(f: Finding) -> tuple[str, ...]:
    return ("right", "left") if f.side == "bilateral" else (f.side or "right",)


def _ribs(g: _Frame, findings: tuple[Finding, ...]):
    """Posterior ribs: bands along curves that drop laterally; fractures break one rib on one side."""
    a, au, v = g.a, g.au, g.v
    q = np.maximum(v - a.rib_first - (1.4 * au * au - 0.15 * au), 0.0)
    t = (q / a.rib_gap) ** 0.93  # rib index coordinate; spacing widens downwards
    cage = _ramp(g.lw + 0.015 - au, g.e) * _ramp(au - 0.03, g.e) * (t < 10)
    callus = 0.0
    for f in findings:
        if f.label != "Fracture":
            continue
        k, u_f = f.rib - 1, 0.72 * a.cage_hw
        on_rib = g.side(f.side) * (np.abs(t - k - 0.45) < 0.6)
        if f.kind == "healed":  # bony callus over the healed break, slight step
            v_f = a.rib_first + 1.4 * u_f * u_f - 0.15 * u_f + a.rib_gap * (k + 0.45) ** (1 / 0.93)
            callus = callus + np.exp(-(((au - u_f) / 0.025) ** 2) - ((v - v_f) / 0.022) ** 2) * g.side(f.side)
            t = t + 0.2 * on_rib * (au > u_f)
        else:  # acute: a lucent gap and the lateral fragment displaced
            t = t + 0.5 * on_rib * (au > u_f)
            cage = cage * (1.0 - on_rib * _ramp(0.02 - np.abs(au - u_f), g.e))
    frac = t - np.floor(t)
    return _ramp(0.2 - np.abs(frac - 0.45), 0.1) * cage + 1.2 * callus


def _devices(g: _Frame, findings: tuple[Finding, ...]):
    """Tubes, lines and pacemakers: metal-dense polylines drawn with PIL at the working resolution."""
    devices = [f for f in findings if f.label == "Support Devices"]
    if not devices:
        return 0.0
    a, n = g.a, g.n
    img = Image.new("F", (n, n), 0.0)
    d = ImageDraw.Draw(img)
    w1 = max(1, round(0.006 * n))
    for f in devices:
        j = np.random.default_rng(f.seed).uniform(-1, 1, 4) * 0.015
        if f.kind == "endotracheal tube":
            d.line(g.to_pixels([(0.0, -0.1), (j[0], 0.2), (j[0], 0.28 + j[1])]), fill=1.0, width=2 * w1)
        elif f.kind == "enteric tube":
            pts = [(0.01, -0.1), (0.0, 0.4), (0.03 + j[0], a.dome_left + 0.04),
                   (0.15, a.dome_left + 0.09 + j[1]), (0.2, a.dome_left + 0.06)]  # down into the stomach
            d.line(g.to_pixels(pts), fill=0.9, width=w1, joint="curve")
        elif f.kind == "central line":
            pts = [(-0.13 + j[0], -0.1), (-0.07, 0.15), (-0.04, 0.25), (-0.03, 0.36 + j[1])]
            d.line(g.to_pixels(pts), fill=0.9, width=w1, joint="curve")
        elif f.kind == "pacemaker":
            box = g.to_pixels([(0.24 + j[0], 0.17 + j[1]), (0.33 + j[0], 0.23 + j[1])])
            d.rounded_rectangle([box[0], box[1]], radius=max(1, n // 60), fill=1.6)
            for tip in ((-0.03, a.heart_v - 0.1), (0.04, a.heart_v + 0.04)):
                pts = [(0.26 + j[0], 0.2 + j[1]), (0.12, 0.2), (0.03, 0.3), (-0.02, 0.42), tip]
                d.line(g.to_pixels(pts), fill=0.9, width=w1, joint="curve")
        else:
            raise ValueError(f"unknown support device kind {f.kind!r}")
    return np.asarray(img)


def _markings(a: Anatomy, n: int, rng: np.random.Generator):
    """Vessel markings at resolution n: streaks radiating from each hilum, fading to the periphery."""
    u, v = _coords(a, n)
    hu, hv = np.abs(u) - 0.1, v - 0.40
    r = np.sqrt(hu * hu + hv * hv)
    theta = np.arctan2(hv, hu)
    phase = rng.uniform(0, 2 * np.pi, 6).tolist()
    s = np.sign(u)
    m = np.cos(23 * theta + phase[0] + s * phase[1]) + np.cos(37 * theta + 9 * r + phase[2] + s * phase[3])
    m = m + np.cos(51 * theta - 13 * r + phase[4] + s * phase[5])
    hilum = np.exp(-r * r / 0.0016)
    return np.maximum(m, 0.0) * (1.0 / 3.0) * (np.exp(-r / 0.2) - np.exp(-r / 0.03)) + hilum


def _pathology_fields(g: _Frame, findings: tuple[Finding, ...]):
    """Loss of aeration (0..1, max-combined), added density, pneumothorax air and marking gain."""
    a, au, v, e = g.a, g.au, g.v, g.e
    opac, dens, ptx_air, markings_gain = 0.0, 0.0, 0.0, 1.0
    for f in findings:
        st = 1.0 if f.status == 1 else HEDGED_STRENGTH
        rng = np.random.default_rng(f.seed)
        if f.label == "Pleural Effusion":  # dependent fluid with a meniscus climbing the lateral wall
            h = {"small": 0.05, "moderate": 0.13, "large": 0.24}[f.severity or "small"] * st
            for s in _sides(f):
                base = a.dome_right if s == "right" else a.dome_left
                top = base - h - 0.06 * (au / a.cage_hw) ** 2
                fluid = g.side(s) * _ramp(v - top, 0.02) * _ramp(g.lw + 0.01 - au, e) * _ramp(au - 0.015, e)
                opac, dens = np.maximum(opac, 0.95 * fluid), dens + 0.12 * fluid
        elif f.label == "Pneumothorax":  # visceral pleural line, no markings lateral to it
            d = {"small": 0.035, "moderate": 0.07, "large": 0.12}[f.severity or "small"] * st
            dr = d * _interp(v, [a.apex, 0.35, 0.75], [1.0, 0.8, 0.3])
            inner = np.minimum(g.lw - dr - au, v - a.apex - 1.2 * d)
            space = g.side(f.side) * g.lung
            ptx_air = ptx_air + space * (1.0 - _ramp(inner, e))
            dens = dens + 0.3 * space * np.clip(1.0 - np.abs(inner) * (g.n * a.scale / 1.2), 0.0, 1.0)
        elif f.label in ("Consolidation", "Pneumonia", "Lung Opacity"):
            dense = f.label == "Consolidation"
            blob = g.blob(f, 0.085 if dense else 0.1, rng, lobes=3 if dense else 7)
            opac = np.maximum(opac, (0.85 if dense else 0.55) * st * blob)
        elif f.label == "Edema":  # bilateral perihilar haze, busier interstitial markings
            s = {"mild": 0.3, "moderate": 0.5, "severe": 0.7}[f.severity or "mild"] * st
            haze = np.exp(-(((au - 0.12) / 0.15) ** 2) - ((v - 0.43) / 0.17) ** 2) * g.lung
            opac, markings_gain = np.maximum(opac, s * haze), markings_gain + 1.5 * s
        elif f.label == "Atelectasis":  # plate-like bands above the base
            th = (0.009 if f.severity == "mild" else 0.015) * (0.7 + 0.3 * st)
            for s in _sides(f):
                base = a.dome_right if s == "right" else a.dome_left
                for _ in range(1 + int(rng.random() < 0.5)):
                    v0, slope = base - float(rng.uniform(0.06, 0.13)), float(rng.uniform(-0.15, 0.15))
                    u0, half = float(rng.uniform(0.35, 0.6)) * a.cage_hw, float(rng.uniform(0.05, 0.09))
                    band = _ramp(th - np.abs(v - v0 - slope * (au - u0)), e) * _ramp(half - np.abs(au - u0), 0.02)
                    opac = np.maximum(opac, 0.7 * st * band * g.side(s) * g.lung)
        elif f.label == "Lung Lesion":  # round, sharply marginated, slightly lobulated
            r = 0.5 * f.size_cm / CM_PER_UNIT
            u0 = (0.55 + 0.15 * float(rng.uniform(-1, 1))) * a.cage_hw
            v0 = ZONE_V[f.zone or "upper"] + 0.03 * float(rng.uniform(-1, 1))
            du, dv = rng.normal(0, 0.4 * r, 2).tolist()
            dist = np.minimum(np.hypot(au - u0, v - v0) - r, np.hypot(au - u0 - du, v - v0 - dv) - 0.7 * r)
            lesion = _ramp(-dist, e) * g.side(f.side)
            opac, dens = np.maximum(opac, 0.6 * st * lesion), dens + 0.3 * st * lesion
        elif f.label == "Pleural Other":  # pleural thickening along the wall, or calcified plaques
            if f.kind == "thickening":
                if f.zone == "apical":
                    span = _ramp(a.apex + 0.12 - v, 0.02)
                else:
                    span = _ramp(v - 0.3, 0.03) * _ramp(g.dome_base - v, 0.02)
                band = g.side(f.side) * _ramp(au - (g.lw - 0.02), e) * _ramp(g.lw + 0.012 - au, e) * span
                opac, dens = np.maximum(opac, band * st), dens + 0.25 * st * band
            else:
                for v0 in rng.uniform(0.3, 0.6, 3).tolist():
                    u0 = a.cage_hw * (0.97 + 0.1 * (v0 - 0.3)) - 0.015
                    plaque = _ramp(1.0 - ((au - u0) / 0.012) ** 2 - ((v - v0) / 0.035) ** 2, 0.3)
                    dens = dens + 0.5 * st * plaque * g.side(f.side)
    return opac, dens, ptx_air, markings_gain


def draw(anatomy: Anatomy, findings: tuple[Finding, ...] = (), size: int = 256) -> np.ndarray:
    """Render one radiograph, (size, size) uint8. A pure function of its arguments."""
    check_size(size)
    a = anatomy
    n = size // 2 if size >= 128 else size  # working resolution: the anatomy is smooth
    g = _Frame(a, n)
    rng = np.random.default_rng(a.texture_seed)
    au, v, e = g.au, g.v, g.e
    width = a.cage_hw + a.soft_margin
    body_hw = _interp(v, [0.0, 0.04, 0.08, 0.13, 0.2, 0.3], [0.07, 0.09, 0.2, 0.33, width + 0.04, width])
    body = _ramp(body_hw - au, e) * (0.7 + 0.3 * _ramp(a.cage_hw - au, 0.05))
    ctr = heart_ctr(a, findings)
    ha = ctr * a.cage_hw  # heart half width: its full width / thorax width = ctr
    hb = 0.11 + 0.25 * ha
    du, dv = g.u - 0.3 * ha, v - a.heart_v
    heart = _ramp(1.0 - ((du + 0.35 * dv) / ha) ** 2 - (dv / hb) ** 2, 0.08)
    widen = {"mild": 1.45, "moderate": 1.8}
    ecm = max((widen[f.severity or "mild"] if f.status == 1 else 1.25 for f in findings
               if f.label == "Enlarged Cardiomediastinum"), default=1.0)
    med_hw = a.mediastinum_hw * _interp(v, [0.0, a.heart_v - 0.12, a.heart_v], [ecm, ecm, 1.0])
    knob = np.exp(-(((g.u - med_hw - 0.005) / 0.025) ** 2) - ((v - 0.27) / 0.03) ** 2)
    med = np.maximum(_ramp(med_hw - np.abs(g.u - 0.01), e), knob)
    opac, dens, ptx_air, markings_gain = _pathology_fields(g, findings)
    aeration = a.air * g.lung * (1.0 - heart) * (1.0 - med) * (1.0 - opac)
    trachea = _ramp(0.013 - np.abs(g.u), e) * _ramp(0.34 - v, e)
    bubble = np.exp(-(((g.u - 0.15) / 0.05) ** 2) - ((v - a.dome_left - 0.05) / 0.025) ** 2)
    spine = _ramp(0.04 - np.abs(g.u), e) * (0.8 + 0.2 * np.cos(2 * np.pi * v / 0.05) ** 2)
    clavicle = (a.clavicle_v - 0.17 * (au - 0.03) + 0.15 * (au - 0.03) ** 2)
    clavicle = _ramp(0.013 - np.abs(v - clavicle), e) * _ramp(au - 0.03, e) * _ramp(0.34 - au, e)
    humerus = _ramp(0.05 - np.hypot(au - width - 0.01, v - 0.16), e)
    bone = 0.25 * spine + 0.13 * _ribs(g, findings) + 0.15 * clavicle + 0.2 * humerus
    markings = _resize(_markings(a, n // 2, rng).astype(np.float32), n)  # smooth enough for half resolution
    vessels = 0.25 * markings_gain * markings * aeration * (1.0 - np.clip(ptx_air, 0.0, 1.0))
    heart_above = heart * _ramp(g.dome + 0.02 - v, 0.03)  # the heart sits on the diaphragm
    A = body * (0.7 + 0.06 * heart_above + 0.08 * med) + 0.15 * opac * g.lung - aeration
    A = A - 0.2 * trachea * body - 0.3 * bubble * body
    A = A + a.bone * bone * body + vessels + dens - 0.12 * ptx_air + _devices(g, findings)
    mottle = _resize(rng.normal(1.0, 0.04, (4, 4)).astype(np.float32), n)
    x = 1.0 - np.exp(-a.gain * np.maximum(A * mottle, 0.0))  # exposure; smooth, so before upsampling
    x = _resize(x.astype(np.float32), size)
    start = int(rng.integers(NOISE_BANK - size * size))
    x = x + (a.noise * (0.3 + 0.7 * x)) * _noise_bank()[start:start + size * size].reshape(size, size)
    lut = (np.linspace(0.0, 1.0, LUT_LEVELS) ** a.gamma * 255.0 + 0.5).astype(np.uint8)  # display gamma
    return lut[np.clip(x * (LUT_LEVELS - 1) / 0.97, 0, LUT_LEVELS - 1).astype(np.intp)]


def _interp(v: np.ndarray, xp, fp) -> np.ndarray:
    return np.interp(v, xp, fp).astype(np.float32)  # np.interp returns float64: keep fields float32


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    return x if x.shape[0] == size else np.asarray(Image.fromarray(x, mode="F").resize((size, size), Image.BILINEAR))


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """Unit Gaussian pixel noise, drawn once: each image reads it from a random offset (drawing fresh
    noise for every image would cost as much as the whole anatomy)."""
    return np.random.default_rng(NOISE_SEED).standard_normal(NOISE_BANK, dtype=np.float32)
