"""The digits data set (it ships inside scikit-learn, so this runs offline), split non-IID.

A fixed fifth of the samples is the common test set. Of the rest, `own_share` of each digit d
goes to the sites that own d (site k owns the digits with d % m == k % m, m = min(sites, 10)),
and the others are spread evenly: each site sees mostly its own digits, so no site alone learns
all ten well, and with more than ten sites every digit has several owners.
"""

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def _split(seed: int) -> tuple[np.ndarray, ...]:
    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    return train_test_split(
        features, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )


def test_set(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    _, x_test, _, y_test = _split(seed)
    return torch.from_numpy(x_test), torch.from_numpy(y_test)


def site_test_set(site: int, sites: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The test samples of the digits site `site` (0-based) owns: its own data, on which it
    evaluates models in cross-site evaluation."""
    x_test, y_test = test_set(seed)
    mine = y_test % min(sites, 10) == site % min(sites, 10)
    return x_test[mine], y_test[mine]


def site_set(
    site: int, sites: int, own_share: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training samples of site `site` (0-based) among `sites`."""
    x_train, _, y_train, _ = _split(seed)
    rng = np.random.default_rng(seed)
    residue = y_train % min(sites, 10)
    owners_of_residue = (sites - residue + min(sites, 10) - 1) // min(
        sites, 10
    )  # sites k < sites with k % m == r
    own = residue + min(sites, 10) * rng.integers(0, owners_of_residue)
    owner = np.where(
        rng.random(len(y_train)) < own_share, own, rng.integers(0, sites, len(y_train))
    )
    mine = owner == site
    return torch.from_numpy(x_train[mine]), torch.from_numpy(y_train[mine])


def train_set(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training sample: what a central baseline trains on."""
    x_train, _, y_train, _ = _split(seed)
    return torch.from_numpy(x_train), torch.from_numpy(y_train)
