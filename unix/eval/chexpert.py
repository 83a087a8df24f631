"""The 14 CheXpert observations, in the CheXpert column order, and the paper's 5-finding subset."""

CHEXPERT_FINDINGS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)
# The subset of the paper's F1-5 columns (and of CheXbert-based report evaluation in general).
FIVE_FINDINGS = ("Atelectasis", "Cardiomegaly", "Edema", "Consolidation", "Pleural Effusion")
