"""The executor tests' fixtures: tiny models (64-position tables), random token data and hand-built Plans
from tests/_tiny.py (no planner, no network)."""

from __future__ import annotations

import pytest
import torch
from _tiny import make_plan, short_model, token_data


@pytest.fixture
def tiny():
    return short_model


@pytest.fixture
def data():
    return token_data


@pytest.fixture
def plan_for():
    return make_plan


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
