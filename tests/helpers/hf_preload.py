"""Imported once by the fork server of `run_on_ranks` (tests/helpers/distributed.py), before it
forks the ranks: transformers and the modeling module of every family of tests/helpers/hf_models.
Imported in each of 4 ranks on 2 cores instead, they cost about 7 s of every launch that trains
a Hugging Face model."""

import importlib

import transformers  # noqa: F401

from tests.helpers.hf_models import FAMILIES

for _model_type in FAMILIES:
    importlib.import_module(f"transformers.models.{_model_type}.modeling_{_model_type}")
