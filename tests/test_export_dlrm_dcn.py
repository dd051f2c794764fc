"""torchrec's DLRM_DCN with a RobeEmbeddingBagCollection through torch.export: the float training
model and its int8 quantized twin export with dynamic batch size and id count, match eager at
other sizes, and an artifact saved by save_exported and loaded in a fresh process (where every
unpickler raises) gives eager's outputs."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from typing import Tuple

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM_DCN
from torchrec.modules.embedding_configs import PoolingType

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.export import ArtifactError, export_model, load_exported, robe_layouts, save_exported
from robe_torchrec.modules.quant_robe_embedding_bag_collection import robe_quantization_mapping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURES = ["f0", "f1", "f2"]
# example shape first, then other batch sizes and id counts (a batch of 1; one with no ids at all)
SIZES = [(5, 0), (1, 1), (9, 2), (3, 3)]


def _model() -> DLRM_DCN:
    tables = [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=100, feature_names=["f0"]),
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=100, feature_names=["f1", "f2"],
                           pooling=PoolingType.MEAN),
    ]
    torch.manual_seed(0)
    ebc = RobeEmbeddingBagCollection(tables, RobeConfig(num_elements=203, block_size=4, seed=2))
    return DLRM_DCN(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 8],
                    over_arch_layer_sizes=[8, 1], dcn_num_layers=2, dcn_low_rank_dim=4).eval()


def _inputs(batch: int, seed: int) -> Tuple[torch.Tensor, KeyedJaggedTensor]:
    g = torch.Generator().manual_seed(seed)
    high = 1 if seed == 3 else 4  # seed 3: every bag empty, zero ids
    lengths = torch.randint(0, high, (len(FEATURES) * batch,), generator=g)
    n = int(lengths.sum())
    kjt = KeyedJaggedTensor(keys=FEATURES, values=torch.randint(-(2**40), 2**40, (n,), generator=g), lengths=lengths)
    return torch.randn(batch, 4, generator=g), kjt


def _quantized(model: DLRM_DCN) -> torch.nn.Module:
    from torchrec.inference.modules import quantize_inference_model

    return quantize_inference_model(copy.deepcopy(model), quantization_mapping=robe_quantization_mapping())


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "int8"])
def test_dlrm_dcn_exports_with_dynamic_batch_and_ids(quantize: bool) -> None:
    model = _model()
    if quantize:
        model = _quantized(model)
    program = export_model(model, _inputs(*SIZES[0]))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert ("robe.pooled_lookup_stored.default" if quantize else "robe.pooled_forward.default") in targets
    exported = program.module()
    with torch.no_grad():
        for batch, seed in SIZES:
            dense, kjt = _inputs(batch, seed)
            torch.testing.assert_close(exported(dense, kjt), model(dense, kjt), rtol=0, atol=0)


def test_dlrm_dcn_artifacts_reload_in_a_fresh_process(tmp_path) -> None:
    model = _model()
    quant = _quantized(model)
    example = _inputs(*SIZES[0])
    float_path, quant_path = str(tmp_path / "float.pt2"), str(tmp_path / "int8.pt2")
    save_exported(export_model(model, example), float_path, layout=robe_layouts(model))
    save_exported(export_model(quant, example), quant_path)
    io = {}
    with torch.no_grad():
        for batch, seed in SIZES[1:]:
            dense, kjt = _inputs(batch, seed)
            io[f"{batch}_{seed}"] = {"dense": dense, "values": kjt.values(), "lengths": kjt.lengths(),
                                     "float": model(dense, kjt), "int8": quant(dense, kjt)}
    torch.save(io, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        import torch
        from torchrec import KeyedJaggedTensor
        from robe_torchrec.export import load_exported
        from tests.no_unpickling import no_unpickling
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        with no_unpickling():  # any torch.load / pickle.load(s) / Unpickler raises
            served = {{"float": load_exported({float_path!r}).module(), "int8": load_exported({quant_path!r}).module()}}
        for name, case in io.items():
            kjt = KeyedJaggedTensor(keys={FEATURES!r}, values=case["values"], lengths=case["lengths"])
            for kind, module in served.items():
                out = module(case["dense"], kjt)
                assert torch.equal(out, case[kind]), (name, kind, (out - case[kind]).abs().max())
        assert "robe_torchrec.train" not in sys.modules and "robe_torchrec.app" not in sys.modules
        print("fresh process OK")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "fresh process OK" in run.stdout, run.stderr[-3000:]
    # both artifacts carry their layout: serving them under another is refused
    for path, layout in ((float_path, robe_layouts(model)), (quant_path, robe_layouts(quant))):
        assert load_exported(path, expected_layout=layout) is not None
        other = {k: [dict(g, seed=g["seed"] + 1) for g in v] for k, v in layout.items()}
        with pytest.raises(ArtifactError, match="expected"):
            load_exported(path, expected_layout=other)


def test_saving_a_float_program_needs_its_true_layout(tmp_path) -> None:
    model = _model()
    program = export_model(model, _inputs(*SIZES[0]))
    with pytest.raises(ValueError, match="pass layout=robe_layouts"):
        save_exported(program, str(tmp_path / "a.pt2"))
    wrong = {k: [dict(g, block_size=8) for g in v] for k, v in robe_layouts(model).items()}
    with pytest.raises(ValueError, match="does not match the program"):
        save_exported(program, str(tmp_path / "b.pt2"), layout=wrong)
