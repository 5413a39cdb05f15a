"""The card's ceilings on a real GPU: measure() gives rates in a plausible range for a datacenter card, and the
planner plans with what ceilings_for() says (the table's values, or the measured ones)."""

import os

import pytest
import torch

from flashforge_hf import ceilings, planner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="run with TRITON_INTERPRET=0"),
]


def test_measure_gives_plausible_rates():
    device = torch.device("cuda", torch.cuda.current_device())
    c = ceilings.measure(device)
    print(c.describe())
    assert c.source == "measured" and c.card == torch.cuda.get_device_properties(device).name
    assert 5e11 < c.bandwidth < 2e13  # bytes/s, read plus written
    assert 5e13 < c.matmul_flops < 5e15
    assert 2e13 < c.tile_flops <= 1.2 * c.matmul_flops  # the segment kernel's tiles never beat a GEMM by much


def test_planner_uses_the_cards_ceilings():
    device = torch.device("cuda", torch.cuda.current_device())
    rates = ceilings.ceilings_for(device)
    model = planner.DeviceModel.for_device(device)
    assert (model.bandwidth, model.flops) == (rates.bandwidth, rates.tile_flops)
    assert model.num_sms == torch.cuda.get_device_properties(device).multi_processor_count
