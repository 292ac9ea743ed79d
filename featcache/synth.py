"""A synthetic Visium HD dataset in Space Ranger's on-disk layout (docs/design.md §3).

No real Visium HD data can be downloaded here, so tests and the demo use this. Per sample it
writes::

    <out>/<sample>/outs/binned_outputs/square_008um/{filtered,raw}_feature_bc_matrix.h5
    <out>/<sample>/outs/binned_outputs/square_008um/spatial/{tissue_positions.parquet,
        scalefactors_json.json, tissue_hires_image.png, tissue_lowres_image.png}
    <out>/<sample>/outs/{feature_slice.h5, metrics_summary.csv}
    <out>/<sample>/<sample>_tissue_image.btf         tiled pyramidal BigTIFF, ~0.2738 µm/px
    <out>/<sample>/synthetic_truth.h5                true per-bin expression rates (not 10x)

The tissue is a colorectal-like section on a 2 µm "fine" grid aligned with the bins: stroma,
tumour and goblet-rich glands with lumens, a smooth-muscle layer and immune aggregates, drawn in
H&E by Beer-Lambert mixing of haematoxylin and eosin with nuclei of several kinds. Expression
follows the compartments each bin covers through marker programmes, with a smooth spatial
modulation, overdispersed (gamma-Poisson) counts and library sizes like real 8 µm bins. Patients
differ in composition, stain colour and sequencing depth. The bin grid is slightly rotated and
offset from the image axes (and flipped for some samples). Everything is deterministic per seed.
"""

from __future__ import annotations

import csv
import json
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import tifffile
from PIL import Image
from scipy import ndimage

from featcache import spaceranger as sr
from featcache.errors import FeatcacheError
from featcache.geometry import BIN_UM

MICRONS_PER_PIXEL = 0.2738
FINE = 4  # fine cells (2 µm) per 8 µm bin along each axis
COMPARTMENTS = ("background", "stroma", "tumour", "goblet", "lumen", "muscle", "immune")
BG, STROMA, TUMOUR, GOBLET, LUMEN, MUSCLE, IMMUNE = range(len(COMPARTMENTS))

# Marker programmes: gene -> (base level, {compartment: loading}); unlisted compartments get a
# small leak. Levels are relative units; each compartment profile is normalised to sum to one.
_ALL = {c: 1.0 for c in range(1, len(COMPARTMENTS))}
MARKERS: dict[str, tuple[float, dict[int, float]]] = {
    # tumour / epithelium
    "EPCAM": (1.5, {TUMOUR: 1.0, GOBLET: 0.7}),
    "CEACAM5": (2.5, {TUMOUR: 1.0, GOBLET: 0.4}),
    "CEACAM6": (1.5, {TUMOUR: 1.0, GOBLET: 0.3}),
    "KRT8": (2.0, {TUMOUR: 1.0, GOBLET: 0.8}),
    "KRT20": (1.5, {TUMOUR: 0.6, GOBLET: 1.0}),
    "OLFM4": (2.0, {TUMOUR: 1.0, GOBLET: 0.2}),
    "MUC12": (1.0, {TUMOUR: 0.4, GOBLET: 1.0}),
    "PIGR": (1.5, {TUMOUR: 0.5, GOBLET: 1.0}),
    "KRT18": (1.5, {TUMOUR: 1.0, GOBLET: 0.7}),
    "KRT19": (1.5, {TUMOUR: 1.0, GOBLET: 0.8}),
    "LGALS4": (1.5, {TUMOUR: 1.0, GOBLET: 0.9}),
    "PHGR1": (1.2, {TUMOUR: 1.0, GOBLET: 0.8}),
    "ELF3": (0.8, {TUMOUR: 1.0, GOBLET: 0.6}),
    "CDH17": (0.8, {TUMOUR: 1.0, GOBLET: 0.8}),
    "AGR2": (1.0, {TUMOUR: 0.7, GOBLET: 1.0}),
    "TFF3": (1.0, {TUMOUR: 0.3, GOBLET: 1.0}),
    # goblet
    "FCGBP": (2.5, {GOBLET: 1.0, LUMEN: 0.3}),
    "MUC2": (3.0, {GOBLET: 1.0, LUMEN: 0.5}),
    "ZG16": (1.5, {GOBLET: 1.0}),
    "CLCA1": (1.5, {GOBLET: 1.0}),
    "SPINK4": (1.0, {GOBLET: 1.0, TUMOUR: 0.2}),
    "REG4": (1.0, {GOBLET: 1.0, TUMOUR: 0.4}),
    # fibroblast / stroma
    "COL1A1": (3.0, {STROMA: 1.0, MUSCLE: 0.2}),
    "COL1A2": (2.5, {STROMA: 1.0, MUSCLE: 0.2}),
    "COL3A1": (2.5, {STROMA: 1.0, MUSCLE: 0.25}),
    "LUM": (1.5, {STROMA: 1.0}),
    "DCN": (1.5, {STROMA: 1.0, MUSCLE: 0.2}),
    "VIM": (1.5, {STROMA: 1.0, IMMUNE: 0.5, MUSCLE: 0.4}),
    "SPARC": (1.2, {STROMA: 1.0, TUMOUR: 0.2}),
    "MGP": (1.0, {STROMA: 1.0, MUSCLE: 0.4}),
    "COL6A3": (0.6, {STROMA: 1.0}),
    # smooth muscle
    "DES": (3.0, {MUSCLE: 1.0}),
    "ACTG2": (3.0, {MUSCLE: 1.0, STROMA: 0.1}),
    "MYH11": (2.0, {MUSCLE: 1.0}),
    "TAGLN": (3.0, {MUSCLE: 1.0, STROMA: 0.3}),
    "CNN1": (1.5, {MUSCLE: 1.0}),
    "MYL9": (2.0, {MUSCLE: 1.0, STROMA: 0.3}),
    # plasma / B cells
    "IGKC": (6.0, {IMMUNE: 1.0, STROMA: 0.25}),
    "JCHAIN": (3.0, {IMMUNE: 1.0, STROMA: 0.2}),
    "IGHG1": (3.0, {IMMUNE: 1.0, STROMA: 0.15}),
    "IGHA1": (4.0, {IMMUNE: 1.0, STROMA: 0.25}),
    "MZB1": (1.5, {IMMUNE: 1.0}),
    "IGHM": (1.0, {IMMUNE: 1.0}),
    # myeloid / antigen-presenting
    "CD74": (3.0, {IMMUNE: 1.0, STROMA: 0.4, TUMOUR: 0.3}),
    "HLA-DRA": (1.5, {IMMUNE: 1.0, STROMA: 0.4}),
    "LYZ": (1.5, {STROMA: 0.6, IMMUNE: 1.0}),
    "C1QC": (1.0, {STROMA: 0.8, IMMUNE: 1.0}),
    "C1QB": (0.8, {STROMA: 0.8, IMMUNE: 1.0}),
    "APOE": (0.8, {STROMA: 0.7, IMMUNE: 0.6}),
    # mitochondrial (everywhere, a little higher in tumour)
    "MT-CO3": (0.6, {**_ALL, TUMOUR: 1.4}),
    "MT-ATP6": (0.6, {**_ALL, TUMOUR: 1.4}),
    "MT-CO1": (0.5, {**_ALL, TUMOUR: 1.3}),
    "MT-CO2": (0.45, {**_ALL, TUMOUR: 1.3}),
    "MT-ND4": (0.3, _ALL),
    # housekeeping
    "ACTB": (2.0, {**_ALL, MUSCLE: 1.5}),
    "B2M": (2.0, {**_ALL, IMMUNE: 2.0}),
    "TMSB4X": (2.0, {**_ALL, IMMUNE: 1.8}),
    "FTL": (1.5, _ALL),
    "EEF1A1": (2.0, _ALL),
    "TPT1": (1.5, _ALL),
    "RPLP0": (1.0, _ALL),
}
MIN_GENES = len(MARKERS)  # the panel holds every marker; `featcache synth --help` states this number
LEAK = 0.04
NB_SIZE = 2.5  # counts ~ Poisson(rate × Gamma(NB_SIZE, 1/NB_SIZE)): negative binomial with this size

# UMIs of an 8 µm bin made wholly of one compartment (before patient depth and noise).
UMI_DENSITY = np.array([3.0, 330.0, 700.0, 480.0, 70.0, 300.0, 620.0])
# Nuclei per 100 µm² by compartment, and the sprite kind each compartment's nuclei take.
NUCLEI_DENSITY = np.array([0.0, 0.5, 1.15, 0.8, 0.03, 0.45, 3.2])
NUCLEUS_KIND = np.array([0, 2, 1, 1, 0, 2, 0])  # 0 small round, 1 large oval, 2 spindle
# Stain densities (optical-density weights) of the cytoplasm / matrix by compartment.
EOSIN = np.array([0.0, 0.42, 0.36, 0.18, 0.06, 0.72, 0.22])
HAEMATOXYLIN = np.array([0.0, 0.05, 0.14, 0.16, 0.03, 0.04, 0.10])
TEXTURE = np.array([0.0, 0.55, 0.25, 0.35, 0.2, 0.35, 0.2])
# Ruifrok & Johnston's optical-density vectors for haematoxylin and eosin (RGB).
H_VECTOR = np.array([0.650, 0.704, 0.286])
E_VECTOR = np.array([0.072, 0.990, 0.105])


IMAGE_FORMATS = ("btf", "ome.tif", "tif", "jpg", "png")
COMPRESSIONS = ("zlib", "jpeg", "lzw", "jpeg2000", "none")
SPARSE_GENES = 2000  # above this many genes, counts are drawn sparsely (real-size panels of ~18,000 genes)


@dataclass(frozen=True)
class SynthConfig:
    """One synthetic sample's recipe; every quirk of real deposits has an option here."""

    rows: int = 128  # bins along array_row
    cols: int = 160  # bins along array_col
    n_genes: int = 250
    seed: int = 0
    tile: int = 512
    rotation_deg: float | None = None  # grid rotation; None draws one per sample
    flip_rows: bool | None = None  # array_row runs against pxl_row; None draws per sample
    perspective: float = 0.0  # projective registration: the bin pitch changes by ± this fraction across the grid
    image: str = "btf"  # btf (tiled pyramidal BigTIFF) | ome.tif (tiled pyramidal OME-TIFF) | tif (striped) | jpg | png
    compression: str = "zlib"  # the TIFF's tiles or strips: zlib | jpeg | lzw | jpeg2000 | none
    antibody_features: int = 0  # extra Antibody Capture features in the matrix (never targets)
    missing_genes: int = 0  # the matrix lacks the last N filler genes (another probe-set version)
    write_mpp: bool = True  # False: scalefactors without microns_per_pixel, as older deposits
    spaceranger: str = "3.1.2"  # 4.x also writes outs/segmented_outputs/, as Space Ranger 4 does


def _sample_rng(seed: int, sample: str, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(sample.encode()), zlib.crc32(purpose.encode())])


def gene_table(n_genes: int, seed: int) -> pd.DataFrame:
    """Named marker genes plus low-level filler genes up to ``n_genes`` (shared by all samples)."""
    if n_genes < len(MARKERS):
        raise FeatcacheError(f"--genes must be at least {MIN_GENES} (the named marker genes); got {n_genes}.")
    rng = np.random.default_rng([seed, 7])
    names = list(MARKERS)
    n_fill = n_genes - len(names)
    names += [f"SYN{i:04d}" for i in range(1, n_fill + 1)]
    if n_fill >= 2:
        names[-1] = names[-2]  # real panels repeat some gene names; ids stay unique
    n_comp = len(COMPARTMENTS)
    profile = np.full((n_comp, n_genes), LEAK)
    base = np.empty(n_genes)
    for g, (level, loads) in enumerate(MARKERS.values()):
        base[g] = level
        for comp, load in loads.items():
            profile[comp, g] = load
    k = len(MARKERS)
    base[k:] = rng.lognormal(np.log(0.08), 0.7, n_fill)
    profile[:, k:] = rng.lognormal(0.0, 0.6, (n_comp, n_fill))
    profile[BG] = 1.0
    table = pd.DataFrame({"id": [f"SYNG{i:09d}" for i in range(1, n_genes + 1)], "name": names})
    return table.assign(base=base), profile * base


# --------------------------------------------------------------------------- tissue layout
def _smooth_field(rng, shape, coarse: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth noise upsampled to ``shape``."""
    small = (max(2, shape[0] // coarse + 2), max(2, shape[1] // coarse + 2))
    noise = ndimage.gaussian_filter(rng.standard_normal(small), sigma, mode="wrap")
    noise = (noise - noise.mean()) / (noise.std() + 1e-9)
    zoom = (shape[0] / (small[0] - 1), shape[1] / (small[1] - 1))
    return ndimage.zoom(noise, zoom, order=1)[: shape[0], : shape[1]]


@dataclass
class Patient:
    tumour_fraction: float
    gland_radius_um: float
    n_aggregates_per_mm2: float
    muscle_threshold: float
    depth: float
    h_vector: np.ndarray
    e_vector: np.ndarray
    stain_strength: tuple[float, float]
    gene_batch: np.ndarray
    rotation_deg: float
    flip_rows: bool


def _patient(cfg: SynthConfig, patient: str) -> Patient:
    """What a patient's sections share: composition, stain, depth, gene batch effects, and the slide's placement."""
    rng = _sample_rng(cfg.seed, patient, "patient")
    n_genes = cfg.n_genes
    h = H_VECTOR + rng.normal(0, 0.05, 3)
    e = E_VECTOR + rng.normal(0, 0.05, 3)
    return Patient(
        tumour_fraction=float(rng.uniform(0.35, 0.75)),
        gland_radius_um=float(rng.uniform(38, 55)),
        n_aggregates_per_mm2=float(rng.uniform(1.0, 4.0)),
        muscle_threshold=float(rng.uniform(0.45, 0.7)),
        depth=float(rng.uniform(0.75, 1.35)),
        h_vector=np.clip(h, 0.05, None) / np.linalg.norm(np.clip(h, 0.05, None)),
        e_vector=np.clip(e, 0.02, None) / np.linalg.norm(np.clip(e, 0.02, None)),
        stain_strength=(float(rng.uniform(0.85, 1.2)), float(rng.uniform(0.8, 1.2))),
        gene_batch=rng.lognormal(0, 0.12, n_genes),
        rotation_deg=float(rng.uniform(0.4, 1.6) * rng.choice([-1, 1]))
        if cfg.rotation_deg is None
        else cfg.rotation_deg,
        flip_rows=bool(rng.random() < 0.5) if cfg.flip_rows is None else cfg.flip_rows,
    )


def tissue_layout(cfg: SynthConfig, sample: str, patient: Patient) -> tuple[np.ndarray, np.ndarray]:
    """Compartment labels on the 2 µm fine grid, and a smooth modulation field in [-1, 1]."""
    rng = _sample_rng(cfg.seed, sample, "layout")
    fr, fc = cfg.rows * FINE, cfg.cols * FINE
    u = (np.arange(fr) + 0.5)[:, None] / fr  # 0..1
    v = (np.arange(fc) + 0.5)[None, :] / fc
    n1 = _smooth_field(rng, (fr, fc), 32, 2.0)
    n2 = _smooth_field(rng, (fr, fc), 32, 2.0)
    cu, cv = 0.5 + rng.normal(0, 0.03), 0.5 + rng.normal(0, 0.03)
    radius = np.sqrt(((u - cu) / 0.46) ** 2 + ((v - cv) / 0.47) ** 2)
    tissue = radius + 0.08 * n1 < 1.0
    labels = np.where(tissue, STROMA, BG).astype(np.int8)
    # Smooth muscle: the lower rim of the section (the muscularis), wavy.
    muscle = tissue & ((u - cu) / 0.46 + 0.06 * n2 > patient.muscle_threshold)
    labels[muscle] = MUSCLE
    mucosa = tissue & ~muscle

    um_per_fine = BIN_UM / FINE
    # Immune aggregates: discs in the mucosa.
    area_mm2 = mucosa.sum() * (um_per_fine / 1000) ** 2
    n_agg = rng.poisson(patient.n_aggregates_per_mm2 * area_mm2)
    cells = np.argwhere(mucosa)
    if n_agg and len(cells):
        for cy, cx in cells[rng.choice(len(cells), n_agg)]:
            r = rng.uniform(45, 110) / um_per_fine
            _paint_disc(labels, cy, cx, r, IMMUNE, mask=mucosa)

    # Glands on a jittered lattice; tumour where a smooth field is high, goblet-rich elsewhere.
    tumour_field = _smooth_field(rng, (fr, fc), 48, 1.5)
    thresh = np.quantile(tumour_field[mucosa], 1 - patient.tumour_fraction) if mucosa.any() else 0
    spacing = 2.5 * patient.gland_radius_um / um_per_fine
    for gy in np.arange(spacing / 2, fr, spacing):
        for gx in np.arange(spacing / 2, fc, spacing * 0.95):
            cy = int(gy + rng.uniform(-0.25, 0.25) * spacing)
            cx = int(gx + rng.uniform(-0.25, 0.25) * spacing)
            if not (0 <= cy < fr and 0 <= cx < fc) or not mucosa[cy, cx] or labels[cy, cx] == IMMUNE:
                continue
            if rng.random() > 0.88:
                continue
            tumour = tumour_field[cy, cx] > thresh
            r = patient.gland_radius_um / um_per_fine * rng.uniform(0.75, 1.25) * (1.35 if tumour else 1.0)
            _paint_gland(labels, rng, cy, cx, r, TUMOUR if tumour else GOBLET, mucosa, irregular=tumour)
    modulation = np.tanh(_smooth_field(rng, (fr, fc), 24, 1.5))
    return labels, modulation


def _paint_disc(labels, cy, cx, r, value, mask):
    y0, y1 = int(max(cy - r - 1, 0)), int(min(cy + r + 2, labels.shape[0]))
    x0, x1 = int(max(cx - r - 1, 0)), int(min(cx + r + 2, labels.shape[1]))
    yy, xx = np.mgrid[y0:y1, x0:x1]
    inside = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & mask[y0:y1, x0:x1]
    labels[y0:y1, x0:x1][inside] = value


def _paint_gland(labels, rng, cy, cx, r, epithelium, mask, irregular):
    rmax = r * 1.4
    y0, y1 = int(max(cy - rmax - 1, 0)), int(min(cy + rmax + 2, labels.shape[0]))
    x0, x1 = int(max(cx - rmax - 1, 0)), int(min(cx + rmax + 2, labels.shape[1]))
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx)
    dist = np.hypot(dy, dx)
    wobble = 1 + 0.06 * np.sin(3 * theta + rng.uniform(0, 6.3))
    if irregular:
        wobble += 0.15 * np.sin(2 * theta + rng.uniform(0, 6.3)) + 0.1 * np.sin(5 * theta + rng.uniform(0, 6.3))
    outer = dist <= r * wobble
    inner = dist <= r * wobble * rng.uniform(0.35, 0.55 if irregular else 0.6)
    m = mask[y0:y1, x0:x1]
    view = labels[y0:y1, x0:x1]
    view[outer & m] = epithelium
    view[inner & m] = LUMEN


def bin_fractions(labels: np.ndarray) -> np.ndarray:
    """Fraction of each 8 µm bin covered by each compartment: (rows, cols, n_compartments)."""
    fr, fc = labels.shape
    onehot = np.eye(len(COMPARTMENTS), dtype=np.float32)[labels]
    return onehot.reshape(fr // FINE, FINE, fc // FINE, FINE, -1).mean(axis=(1, 3))


# --------------------------------------------------------------------------- expression
def _mixture(fractions: np.ndarray, patient: Patient, profiles: np.ndarray):
    """Per bin: the UMIs each compartment contributes (bins × compartments) and their total."""
    f = fractions.reshape(-1, fractions.shape[-1]).astype(np.float64)
    weight = f * UMI_DENSITY
    return weight, weight.sum(axis=1)


def _library(cfg: SynthConfig, sample: str, patient: Patient, umis: np.ndarray, rng) -> np.ndarray:
    quality = np.exp(0.25 * _smooth_field(rng, (cfg.rows, cfg.cols), 12, 1.5).reshape(-1))
    return patient.depth * umis * quality * rng.lognormal(-0.08, 0.4, len(umis))


def expression(cfg: SynthConfig, sample: str, patient: Patient, fractions, modulation, profiles):
    """True rates (bins × genes, UMIs per bin) and observed counts (genes × bins, CSC) for every bin of the grid."""
    import scipy.sparse as sp

    rng = _sample_rng(cfg.seed, sample, "expression")
    weight, umis = _mixture(fractions, patient, profiles)
    prof = profiles / profiles.sum(axis=1, keepdims=True)
    mix = (weight @ prof) / umis[:, None]
    mix *= patient.gene_batch
    # Smooth spatial programmes: OLFM4 (stem-like) and LYZ (inflammation) vary across the slide.
    mod = modulation.reshape(cfg.rows, FINE, cfg.cols, FINE).mean(axis=(1, 3)).reshape(-1)
    names = list(MARKERS)
    mix[:, names.index("OLFM4")] *= np.exp(0.9 * mod)
    mix[:, names.index("LYZ")] *= np.exp(-0.7 * mod)
    mix[:, names.index("IGKC")] *= np.exp(0.4 * mod)
    mix /= mix.sum(axis=1, keepdims=True)
    library = _library(cfg, sample, patient, umis, rng)
    rates = (library[:, None] * mix).astype(np.float32)
    counts = rng.poisson(rates * rng.gamma(NB_SIZE, 1 / NB_SIZE, rates.shape)).astype(np.int32)
    return rates, sp.csc_matrix(counts.T)


def sparse_expression(cfg: SynthConfig, sample: str, patient: Patient, fractions, profiles, block: int = 20_000):
    """Counts (genes × bins, CSC) of a real-size panel without a dense bins × genes array: each compartment's
    UMIs of a bin (Poisson of a gamma-scaled rate) are spread over the genes by that compartment's profile."""
    import scipy.sparse as sp

    rng = _sample_rng(cfg.seed, sample, "expression")
    weight, umis = _mixture(fractions, patient, profiles)
    library = _library(cfg, sample, patient, umis, rng)
    prof = profiles * patient.gene_batch
    cdf = np.cumsum(prof / prof.sum(axis=1, keepdims=True), axis=1)
    n_genes, n_bins = profiles.shape[1], len(umis)
    parts = []
    for a in range(0, n_bins, block):
        share = weight[a : a + block] / np.maximum(umis[a : a + block, None], 1e-9)
        expect = library[a : a + block, None] * share * rng.gamma(NB_SIZE, 1 / NB_SIZE, share.shape)
        n = rng.poisson(expect)  # UMIs per (bin, compartment)
        bins = np.repeat(np.tile(np.arange(a, a + len(n)), (n.shape[1], 1)).T.ravel(), n.ravel())
        comps = np.repeat(np.tile(np.arange(n.shape[1]), len(n)), n.ravel())
        genes = np.minimum(_draw_genes(cdf, comps, rng), n_genes - 1)
        keys, values = np.unique(bins.astype(np.int64) * n_genes + genes, return_counts=True)
        parts.append((keys // n_genes, keys % n_genes, values))
    cols, rows, data = (np.concatenate(x) for x in zip(*parts))
    return sp.csc_matrix((data.astype(np.int32), (rows, cols)), shape=(n_genes, n_bins))


def _draw_genes(cdf: np.ndarray, comps: np.ndarray, rng) -> np.ndarray:
    """A gene for each UMI, from its compartment's cumulative profile."""
    genes = np.empty(len(comps), np.int64)
    for c in np.unique(comps):
        at = np.flatnonzero(comps == c)
        genes[at] = np.searchsorted(cdf[c], rng.random(len(at)))
    return genes


# --------------------------------------------------------------------------- geometry
def bin_map(cfg: SynthConfig, patient: Patient, margin_px: float) -> np.ndarray:
    """The 3 × 3 map (array_row, array_col, 1) -> (pxl_row, pxl_col, w): rotated, maybe flipped rows, offset,
    and projective when ``cfg.perspective`` > 0 (the bin pitch then changes by ± that fraction across the grid)."""
    pb = BIN_UM / MICRONS_PER_PIXEL
    t = np.radians(patient.rotation_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    flip = np.diag([-1.0 if patient.flip_rows else 1.0, 1.0])
    m = np.eye(3)
    m[:2, :2] = pb * rot @ flip
    if cfg.perspective:
        # p = q_c + d / (1 + g·d), d = A·(r, c) − q_c: exact pitch at the grid's centre, ± perspective at its edges
        q_c = m[:2, :2] @ [(cfg.rows - 1) / 2, (cfg.cols - 1) / 2]
        half = np.abs(m[:2, :2]) @ [(cfg.rows - 1) / 2, (cfg.cols - 1) / 2]
        g = cfg.perspective * np.array([0.8, 0.6]) / half
        centred = np.eye(3)
        centred[:2, 2] = -q_c
        tilt = np.eye(3)
        tilt[:2, :2] += np.outer(q_c, g)
        tilt[:2, 2] = q_c
        tilt[2, :2] = g
        m = tilt @ centred @ m
    corners = np.array([[0, 0, 1], [0, cfg.cols - 1, 1], [cfg.rows - 1, 0, 1], [cfg.rows - 1, cfg.cols - 1, 1.0]])
    mapped = corners @ m.T
    pixels = mapped[:, :2] / mapped[:, 2:]
    shift = np.eye(3)
    shift[:2, 2] = -pixels.min(axis=0) + margin_px
    out = shift @ m
    return out / out[2, 2]


def apply_map(m: np.ndarray, rows, cols) -> tuple[np.ndarray, np.ndarray]:
    w = m[2, 0] * rows + m[2, 1] * cols + m[2, 2]
    return (m[0, 0] * rows + m[0, 1] * cols + m[0, 2]) / w, (m[1, 0] * rows + m[1, 1] * cols + m[1, 2]) / w


# --------------------------------------------------------------------------- image
class HERenderer:
    """Renders H&E pixels of one sample, tile by tile, from the fine-grid layout."""

    def __init__(self, cfg, sample, patient, labels, m):
        rng = _sample_rng(cfg.seed, sample, "image")
        self.patient = patient
        self.inverse = np.linalg.inv(m)
        smooth = lambda a: ndimage.gaussian_filter(a.astype(np.float32), 0.8)  # noqa: E731
        self.eosin = smooth(EOSIN[labels])
        self.haem = smooth(HAEMATOXYLIN[labels])
        self.texture_amp = smooth(TEXTURE[labels])
        tex = ndimage.gaussian_filter(rng.standard_normal((512, 512)), (1.2, 5.0), mode="wrap")
        tex += ndimage.gaussian_filter(rng.standard_normal((512, 512)), (4.0, 1.0), mode="wrap")
        self.texture = (tex / tex.std()).astype(np.float32)
        # Nuclei: Poisson per fine cell by compartment, jittered, converted to full-res pixels.
        lam = NUCLEI_DENSITY[labels] * (BIN_UM / FINE) ** 2 / 100.0
        n = rng.poisson(lam)
        fy, fx = np.nonzero(n)
        reps = n[fy, fx]
        fy, fx = np.repeat(fy, reps), np.repeat(fx, reps)
        kind = NUCLEUS_KIND[labels[fy, fx]]
        ar = (fy + rng.random(len(fy))) / FINE - 0.5
        ac = (fx + rng.random(len(fx))) / FINE - 0.5
        py, px = apply_map(m, ar, ac)
        order = np.argsort(py)
        self.nuc_y, self.nuc_x, self.nuc_kind = py[order], px[order], kind[order]
        self.nuc_variant = rng.integers(0, 6, len(order))
        self.sprites = _nucleus_sprites(rng)
        self.sprite_r = max(s.shape[0] for k in self.sprites for s in k) // 2 + 1

    def render(self, y0: int, x0: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
        yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float64)
        ar, ac = apply_map(self.inverse, yy, xx)
        coords = np.stack([(ar + 0.5) * FINE - 0.5, (ac + 0.5) * FINE - 0.5])
        sample = lambda f: ndimage.map_coordinates(f, coords, order=1, mode="constant", cval=0.0)  # noqa: E731
        eosin = sample(self.eosin)
        haem = sample(self.haem)
        amp = sample(self.texture_amp)
        tex = self.texture[np.ix_(np.arange(y0, y0 + h) % 512, np.arange(x0, x0 + w) % 512)]
        eosin = eosin * np.clip(1 + amp * 0.4 * tex, 0.3, None)
        haem = haem.astype(np.float32) + self._nuclei(y0, x0, h, w)
        hs, es = self.patient.stain_strength
        od = (haem * hs)[..., None] * self.patient.h_vector + (eosin * es)[..., None] * self.patient.e_vector
        od += 0.025  # glass and mounting medium
        rgb = 255.0 * np.exp(-od) + rng.normal(0, 2.5, od.shape)
        return np.clip(rgb, 0, 255).astype(np.uint8)

    def _nuclei(self, y0, x0, h, w) -> np.ndarray:
        r = self.sprite_r
        pad = 2 * r  # sprites centred up to r outside the tile still fit on the canvas
        canvas = np.zeros((h + 2 * pad, w + 2 * pad), np.float32)
        lo, hi = np.searchsorted(self.nuc_y, [y0 - r, y0 + h + r])
        for i in range(lo, hi):
            x = self.nuc_x[i]
            if x < x0 - r or x >= x0 + w + r:
                continue
            s = self.sprites[self.nuc_kind[i]][self.nuc_variant[i]]
            sh = s.shape[0] // 2
            cy, cx = int(round(self.nuc_y[i])) - y0 + pad, int(round(x)) - x0 + pad
            np.maximum(
                canvas[cy - sh : cy + sh + 1, cx - sh : cx + sh + 1],
                s,
                out=canvas[cy - sh : cy + sh + 1, cx - sh : cx + sh + 1],
            )
        return canvas[pad : pad + h, pad : pad + w]


def _nucleus_sprites(rng) -> list[list[np.ndarray]]:
    """Soft elliptical nuclei with chromatin texture; sizes in full-res px (0.27 µm/px)."""
    kinds = []
    for a_um, b_um, dens in ((3.0, 2.8, 1.25), (4.2, 3.1, 0.8), (6.5, 1.6, 1.0)):
        variants = []
        for _ in range(6):
            a, b = a_um / MICRONS_PER_PIXEL, b_um / MICRONS_PER_PIXEL
            a, b = a * rng.uniform(0.85, 1.15), b * rng.uniform(0.85, 1.15)
            half = int(np.ceil(max(a, b))) + 2
            yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(float)
            t = rng.uniform(0, np.pi)
            u = (xx * np.cos(t) + yy * np.sin(t)) / a
            v = (-xx * np.sin(t) + yy * np.cos(t)) / b
            body = 1 / (1 + np.exp((np.hypot(u, v) - 1) * 8))
            chromatin = 1 + 0.25 * ndimage.gaussian_filter(rng.standard_normal(body.shape), 1.0) / 0.2
            variants.append((dens * body * np.clip(chromatin, 0.5, 1.6)).astype(np.float32))
        kinds.append(variants)
    return kinds


def _tiles(renderer, shape, tile, seed, sample, pyramid_level1):
    rng = _sample_rng(seed, sample, "pixels")
    for y0 in range(0, shape[0], tile):
        for x0 in range(0, shape[1], tile):
            h, w = min(tile, shape[0] - y0), min(tile, shape[1] - x0)
            block = renderer.render(y0, x0, h, w, rng)
            small = _halve(block)
            pyramid_level1[y0 // 2 : y0 // 2 + small.shape[0], x0 // 2 : x0 // 2 + small.shape[1]] = small
            if (h, w) != (tile, tile):  # tifffile wants whole tiles
                block = np.pad(block, ((0, tile - h), (0, tile - w), (0, 0)), constant_values=255)
            yield block


def _halve(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    return np.rint(img[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))).astype(np.uint8)


def write_image(path: Path, renderer, shape, cfg: SynthConfig, sample: str) -> list[np.ndarray]:
    """The microscope image in ``cfg.image``'s container; returns the reduced levels (2×, 4×, ... < 2000 px)."""
    level1 = np.full((shape[0] // 2, shape[1] // 2, 3), 255, np.uint8)
    tiles = _tiles(renderer, shape, cfg.tile, cfg.seed, sample, level1)
    compression = None if cfg.compression == "none" else cfg.compression
    resolution = dict(resolutionunit="CENTIMETER", resolution=(1e4 / MICRONS_PER_PIXEL, 1e4 / MICRONS_PER_PIXEL))
    if cfg.image in ("jpg", "png", "tif"):  # one level, assembled whole (small samples)
        full = np.full((*shape, 3), 255, np.uint8)
        for (y0, x0), block in zip(
            ((y, x) for y in range(0, shape[0], cfg.tile) for x in range(0, shape[1], cfg.tile)), tiles
        ):
            h, w = min(cfg.tile, shape[0] - y0), min(cfg.tile, shape[1] - x0)
            full[y0 : y0 + h, x0 : x0 + w] = block[:h, :w]
        if cfg.image == "tif":
            tifffile.imwrite(path, full, photometric="rgb", rowsperstrip=64, compression=compression, **resolution)
        else:
            Image.fromarray(full).save(path, quality=92) if cfg.image == "jpg" else Image.fromarray(full).save(path)
        levels = [level1]
    else:
        levels = _write_pyramid(path, tiles, shape, level1, cfg, compression, resolution)
    while max(levels[-1].shape[:2]) > 2000:
        levels.append(_halve(levels[-1]))
    return levels


def _write_pyramid(path, tiles, shape, level1, cfg: SynthConfig, compression, resolution) -> list[np.ndarray]:
    """A tiled pyramidal BigTIFF (or OME-TIFF with its physical pixel size) written tile by tile."""
    n_reduced, side = 1, max(level1.shape[:2])
    while side > 2000:
        side //= 2
        n_reduced += 1
    opts = dict(tile=(cfg.tile, cfg.tile), compression=compression, photometric="rgb")
    if cfg.compression == "jpeg":
        opts["compressionargs"] = {"level": 90}
    ome = cfg.image == "ome.tif"
    meta = (
        {"metadata": {"PhysicalSizeX": MICRONS_PER_PIXEL, "PhysicalSizeY": MICRONS_PER_PIXEL, "axes": "YXS"}}
        if ome
        else {}
    )
    levels = [level1]
    with tifffile.TiffWriter(path, bigtiff=True, ome=ome) as tw:
        tw.write(tiles, shape=(*shape, 3), dtype=np.uint8, subifds=n_reduced, **opts, **resolution, **meta)
        tw.write(level1, subfiletype=1, **opts)
        for _ in range(n_reduced - 1):
            levels.append(_halve(levels[-1]))
            tw.write(levels[-1], subfiletype=1, **opts)
    return levels


# --------------------------------------------------------------------------- 10x files
def write_matrix_h5(path: Path, barcodes, features: pd.DataFrame, counts, sample: str, version: str) -> None:
    """10x HDF5 v2 feature-barcode matrix, column per bin (CSC); ``counts`` is features × bins (scipy sparse)."""
    import scipy.sparse as sp

    csc = sp.csc_matrix(counts, dtype=np.int32)
    csc.sort_indices()
    with h5py.File(path, "w") as f:
        f.attrs[sr.ATTR_FILETYPE] = sr.MATRIX
        f.attrs[sr.ATTR_LIBRARY_IDS] = np.array([sample.encode()])
        f.attrs[sr.ATTR_ORIGINAL_GEM_GROUPS] = np.array([1])
        f.attrs[sr.ATTR_VERSION] = 2
        f.attrs[sr.ATTR_CHEMISTRY] = "Visium HD v1 (synthetic)"
        f.attrs[sr.ATTR_SOFTWARE_VERSION] = f"spaceranger-{version} (featcache synth)"
        g = f.create_group(sr.MATRIX)
        g.create_dataset(sr.BARCODES, data=np.array(barcodes, dtype="S"), compression="gzip")
        g.create_dataset(sr.DATA, data=csc.data.astype(np.int32), compression="gzip")
        g.create_dataset(sr.INDICES, data=csc.indices.astype(np.int64), compression="gzip")
        g.create_dataset(sr.INDPTR, data=csc.indptr.astype(np.int64), compression="gzip")
        g.create_dataset(sr.SHAPE, data=np.array(csc.shape, dtype=np.int32))
        feat = g.create_group(sr.FEATURES)
        feat.create_dataset(sr.FEATURE_ID, data=np.array(features["id"], dtype="S"))
        feat.create_dataset(sr.FEATURE_NAME, data=np.array(features["name"], dtype="S"))
        feat.create_dataset(sr.FEATURE_TYPE, data=np.array(features["type"], dtype="S"))
        feat.create_dataset(sr.GENOME, data=np.array(["GRCh38"] * len(features), dtype="S"))
        feat.create_dataset(sr.ALL_TAG_KEYS, data=np.array([sr.GENOME.encode()]))


def _barcodes(rows, cols) -> np.ndarray:
    return np.array([sr.bin_barcode(r, c) for r, c in zip(rows.ravel(), cols.ravel())], dtype=object)


def _antibodies(cfg: SynthConfig, sample: str, fractions: np.ndarray, n_bins: int):
    """Antibody Capture features (names, counts features × bins): abundant, so a reader that took them for genes
    would skew every bin's library size."""
    import scipy.sparse as sp

    rng = _sample_rng(cfg.seed, sample, "antibodies")
    immune = fractions.reshape(-1, fractions.shape[-1])[:, IMMUNE]
    means = 40 + 400 * immune[None, :] * rng.uniform(0.2, 1.0, (cfg.antibody_features, 1))
    table = pd.DataFrame(
        {
            "id": [f"ADT{k:04d}" for k in range(cfg.antibody_features)],
            "name": [f"CD{3 + k}-TotalSeqB" for k in range(cfg.antibody_features)],
            "type": sr.ANTIBODY_CAPTURE,
        }
    )
    return table, sp.csc_matrix(rng.poisson(means).astype(np.int32))


def synthesize_sample(
    out: Path, sample: str, cfg: SynthConfig, genes: pd.DataFrame, profiles: np.ndarray, patient: str | None = None
) -> dict:
    import scipy.sparse as sp

    who = _patient(cfg, patient or sample)
    draw = _sample_rng(cfg.seed, sample, "placement")  # each section sits on its slide its own way
    rotation = float(draw.uniform(0.4, 1.6) * draw.choice([-1, 1])) if cfg.rotation_deg is None else cfg.rotation_deg
    who = replace(
        who, rotation_deg=rotation, flip_rows=bool(draw.random() < 0.5) if cfg.flip_rows is None else cfg.flip_rows
    )
    labels, modulation = tissue_layout(cfg, sample, who)
    fractions = bin_fractions(labels)
    dense = cfg.n_genes <= SPARSE_GENES
    rates, counts = (
        expression(cfg, sample, who, fractions, modulation, profiles)
        if dense
        else (None, sparse_expression(cfg, sample, who, fractions, profiles))
    )

    root = out / sample
    outs = root / sr.OUTS
    bin_dir = outs / sr.BIN_DIR
    spatial = bin_dir / sr.SPATIAL
    spatial.mkdir(parents=True, exist_ok=True)
    m = bin_map(cfg, who, 40 * BIN_UM / MICRONS_PER_PIXEL / 8)  # 40 µm of glass around the grid
    rr, cc = np.mgrid[0 : cfg.rows, 0 : cfg.cols]
    pr, pc = apply_map(m, rr.astype(float), cc.astype(float))
    shape = (int(np.ceil(pr.max() + 40 / MICRONS_PER_PIXEL)), int(np.ceil(pc.max() + 40 / MICRONS_PER_PIXEL)))
    in_tissue = (1 - fractions[..., BG]) >= 0.5
    barcodes = _barcodes(rr, cc)
    pd.DataFrame(
        {
            sr.BARCODE: barcodes,
            sr.IN_TISSUE: in_tissue.ravel().astype(np.int32),
            sr.ARRAY_ROW: rr.ravel().astype(np.int32),
            sr.ARRAY_COL: cc.ravel().astype(np.int32),
            sr.PXL_ROW: pr.ravel(),
            sr.PXL_COL: pc.ravel(),
        }
    ).to_parquet(spatial / sr.POSITIONS_PARQUET, index=False)

    keep_genes = len(genes) - cfg.missing_genes
    features = genes.iloc[:keep_genes].assign(type=sr.GENE_EXPRESSION)
    matrix = counts[:keep_genes]
    if cfg.antibody_features:
        table, adt = _antibodies(cfg, sample, fractions, matrix.shape[1])
        features, matrix = pd.concat([features, table], ignore_index=True), sp.vstack([matrix, adt]).tocsc()
    keep = in_tissue.ravel()
    write_matrix_h5(bin_dir / sr.FILTERED_MATRIX, barcodes[keep], features, matrix[:, keep], sample, cfg.spaceranger)
    if dense:
        write_matrix_h5(bin_dir / sr.RAW_MATRIX, barcodes, features, matrix, sample, cfg.spaceranger)

    image_path = root / f"{sample}_{sr.MICROSCOPE_IMAGE_STEM}.{cfg.image}"
    levels = write_image(image_path, HERenderer(cfg, sample, who, labels, m), shape, cfg, sample)
    hires_scale, lowres_scale = _write_png_images(spatial, levels, shape)
    scalefactors = {
        sr.SPOT_DIAMETER_FULLRES: BIN_UM / MICRONS_PER_PIXEL,
        sr.BIN_SIZE_UM: BIN_UM,
        sr.MICRONS_PER_PIXEL: MICRONS_PER_PIXEL,
        sr.REGIST_TARGET_IMG_SCALEF: hires_scale,
        sr.TISSUE_LOWRES_SCALEF: lowres_scale,
        sr.FIDUCIAL_DIAMETER_FULLRES: 1000 * BIN_UM / MICRONS_PER_PIXEL / 8,
        sr.TISSUE_HIRES_SCALEF: hires_scale,
    }
    if not cfg.write_mpp:
        del scalefactors[sr.MICRONS_PER_PIXEL]
    (spatial / sr.SCALEFACTORS).write_text(json.dumps(scalefactors, indent=2))
    _write_outs_extras(outs, sample, cfg, m, matrix[:keep_genes, keep])
    _write_truth(
        root / "synthetic_truth.h5",
        cfg,
        barcodes[keep],
        genes,
        rates[keep] if dense else None,
        fractions.reshape(-1, len(COMPARTMENTS))[keep],
        m,
    )
    umis = np.asarray(matrix[:keep_genes][:, keep].sum(axis=0)).ravel()
    return {
        "sample": sample,
        "patient": patient or sample,
        "bins": int(cfg.rows * cfg.cols),
        "in_tissue_bins": int(keep.sum()),
        "median_umis": float(np.median(umis)),
        "image_shape": list(shape),
        "image": str(image_path),
        "path": str(root),
        "rotation_deg": who.rotation_deg,
        "flip_rows": who.flip_rows,
    }


def _write_png_images(spatial: Path, levels: list[np.ndarray], shape) -> tuple[float, float]:
    """tissue_hires_image.png (longest side ≤ 6000 px) and tissue_lowres_image.png (600 px), as Space Ranger."""
    longest = max(shape)
    hires_scale, lowres_scale = min(0.5, 6000 / longest), 600 / longest
    for name, scalef in ((sr.HIRES_IMAGE, hires_scale), (sr.LOWRES_IMAGE, lowres_scale)):
        size = (max(1, round(shape[1] * scalef)), max(1, round(shape[0] * scalef)))
        src = ([lvl for lvl in levels if lvl.shape[1] >= size[0]] or levels[:1])[-1]
        Image.fromarray(src).resize(size, Image.Resampling.LANCZOS).save(spatial / name)
    return hires_scale, lowres_scale


def _write_outs_extras(outs: Path, sample: str, cfg: SynthConfig, m: np.ndarray, counts) -> None:
    """feature_slice.h5 (with the HD layout and transform matrices scverse readers look for), metrics_summary.csv,
    and Space Ranger 4's segmented_outputs/."""
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]])  # (row, col) <-> (col, row)
    to_micro = swap @ m @ swap
    to_micro /= to_micro[2, 2]
    flat = lambda a: [float(v) for v in np.asarray(a).ravel()]  # noqa: E731
    matrices = {
        "spot_colrow_to_microscope_colrow": flat(to_micro),
        "microscope_colrow_to_spot_colrow": flat(np.linalg.inv(to_micro)),
        "cytassist_colrow_to_spot_colrow": flat(np.eye(3)),
        "spot_colrow_to_cytassist_colrow": flat(np.eye(3)),
    }
    layout = {
        "schema_version": "1.0",
        "file_format": "1.0",
        "num_rows": cfg.rows * 4,
        "num_cols": cfg.cols * 4,
        "spot_pitch": BIN_UM / 4,
        "transform": flat(np.eye(3)),
    }
    with h5py.File(outs / sr.FEATURE_SLICE, "w") as f:
        f.attrs[sr.FEATURE_SLICE_METADATA] = json.dumps(
            {
                "sample_id": sample,
                "nrows": cfg.rows * 4,
                "ncols": cfg.cols * 4,
                "bin_scale": 1,
                "spaceranger_version": f"spaceranger-{cfg.spaceranger} (featcache synth)",
                "transform_matrices": matrices,
                "hd_layout_json": json.dumps(layout),
            }
        )
        f.create_group(sr.FEATURE_SLICES)
    umis = np.asarray(counts.sum(axis=0)).ravel()
    with open(outs / sr.METRICS_SUMMARY, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "Sample ID",
                "Number of bins under tissue (8 µm)",
                "Median UMIs per bin (8 µm)",
                "Mean UMIs per bin (8 µm)",
            ]
        )
        w.writerow([sample, len(umis), float(np.median(umis)), float(umis.mean())])
    if cfg.spaceranger.startswith("4"):
        seg = outs / sr.SEGMENTED_OUTPUTS
        seg.mkdir(exist_ok=True)
        (seg / sr.CELL_SEGMENTATIONS).write_text(json.dumps({"type": "FeatureCollection", "features": []}))


def _write_truth(path: Path, cfg: SynthConfig, barcodes, genes: pd.DataFrame, rates, fractions, m: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["description"] = (
            "True expected UMIs per in-tissue 8 um bin and gene (before gamma-Poisson noise; absent for real-size "
            "panels), the compartment fractions of each bin, and the exact bin->pixel map (3 x 3, projective)."
        )
        f.attrs["nb_size"] = NB_SIZE
        f.attrs["noise_model"] = (
            "counts ~ Poisson(rate * Gamma(nb_size, 1/nb_size)) independently per bin and gene; the library of a "
            "bin is the sum of its Gene Expression counts"
        )
        f.attrs["seed"] = cfg.seed
        f.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        f.create_dataset("gene_ids", data=np.array(genes["id"], dtype="S"))
        if rates is not None:
            f.create_dataset("rates", data=rates, compression="gzip", chunks=True)
        f.create_dataset("compartment_fractions", data=fractions)
        f.create_dataset("compartments", data=np.array(COMPARTMENTS, dtype="S"))
        f.create_dataset("homography", data=m)
        f.create_dataset("affine", data=m[:2] / m[2, 2])


@dataclass(frozen=True)
class SamplePlan:
    """The samples to write: their names, their patients (None: each sample is its own patient) and overrides."""

    names: list[str]
    patients: dict[str, str] | None
    per_sample: dict[str, dict]


def plan_samples(patients: list[str], sections: int = 1, missing_genes: list[str] | None = None) -> SamplePlan:
    """``featcache synth``'s samples: a patient's sections are ``<patient>-s1``, ``-s2``, ... when there are several;
    ``missing_genes`` holds ``SAMPLE=N`` (that sample's matrix lacks the last N genes)."""
    from featcache.prepare import parse_pairs

    if sections < 1:
        raise FeatcacheError(f"--sections {sections}: must be at least 1.")
    by_section = {f"{p}-s{k}": p for p in patients for k in range(1, sections + 1)} if sections > 1 else None
    per_sample = {}
    for sample, n in parse_pairs(missing_genes, "--missing-genes", "sample").items():
        try:
            per_sample[sample] = {"missing_genes": int(n)}
        except ValueError:
            raise FeatcacheError("--missing-genes SAMPLE=N: N must be an integer.") from None
    return SamplePlan(list(by_section or patients), by_section, per_sample)


def synthesize(
    out: str | Path,
    samples: list[str],
    cfg: SynthConfig = SynthConfig(),
    on_sample=None,
    per_sample: dict[str, dict] | None = None,
    patients: dict[str, str] | None = None,
) -> list[dict]:
    """Write the synthetic dataset; refuses to write into an existing sample folder.

    ``per_sample`` overrides SynthConfig fields for some samples (another image container, a missing gene, ...);
    ``patients`` maps samples to patients: sections of one patient share its composition, stain and depth, and a
    ``manifest.csv`` for ``featcache prepare --manifest`` is written beside them.
    """
    out = Path(out)
    if len(set(samples)) != len(samples):
        raise FeatcacheError(f"duplicate sample names in {samples}")
    stray = sorted(set(per_sample or {}) - set(samples))
    if stray:
        raise FeatcacheError(f"--missing-genes names {', '.join(stray)}, which is not a sample ({', '.join(samples)}).")
    configs = {s: replace(cfg, **(per_sample or {}).get(s, {})) for s in samples}
    for s, c in configs.items():
        if c.rows < 32 or c.cols < 32:
            raise FeatcacheError("--rows and --cols must be at least 32 bins (one patch).")
        if c.image not in IMAGE_FORMATS or c.compression not in COMPRESSIONS:
            raise FeatcacheError(
                f"--image {c.image!r} / --compression {c.compression!r}: use one of "
                f"{', '.join(IMAGE_FORMATS)} / {', '.join(COMPRESSIONS)}."
            )
        if not 0 <= c.perspective < 0.5 or c.missing_genes < 0 or c.antibody_features < 0:
            raise FeatcacheError("--perspective must be in [0, 0.5); --missing-genes and --antibody-features ≥ 0.")
        if (out / s).exists():
            raise FeatcacheError(f"{out / s} already exists; choose another OUT folder or remove it.")
    genes, profiles = gene_table(cfg.n_genes, cfg.seed)
    reports = []
    for s in samples:
        reports.append(synthesize_sample(out, s, configs[s], genes, profiles, (patients or {}).get(s)))
        if on_sample:
            on_sample(reports[-1])
    if patients:
        with open(out / "manifest.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["sample", "patient", "path", "image"])
            for r in reports:
                w.writerow([r["sample"], r["patient"], r["sample"], Path(r["image"]).relative_to(out)])
    return reports
