"""Fixtures the engine tests share."""

import pytest


@pytest.fixture(scope="session")
def wide_repo(tmp_path_factory):
    """The 20b's widths (hidden 2,880, expert width 2,880, 64 query heads over 8 KV heads of 64), two layers (one
    sliding, one full), 8 experts and a small vocabulary: where batched decoding once parted from decoding alone
    while the tiny model's shapes agreed."""
    import dataclasses

    from ossie.model.config import PRESETS
    from ossie.synth import write_checkpoint

    cfg = dataclasses.replace(PRESETS["20b"], num_layers=2, layer_types=(), num_experts=8, vocab_size=4096)
    return write_checkpoint(tmp_path_factory.mktemp("wide"), cfg, "hf", seed=2, progress=False)
