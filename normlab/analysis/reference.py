"""The paper's published ImageNet numbers (normlab/reference/gn_paper_imagenet.csv), for the report."""

from __future__ import annotations

from importlib import resources

import pandas as pd


def paper_numbers() -> pd.DataFrame:
    with resources.files("normlab").joinpath("reference/gn_paper_imagenet.csv").open() as f:
        return pd.read_csv(f)


def paper_table(name: str) -> pd.DataFrame:
    paper = paper_numbers()
    return paper[paper["table"] == name].reset_index(drop=True)
