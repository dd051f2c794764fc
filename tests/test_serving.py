"""Serving: QuantRobeEmbeddingBagCollection (int8 / bf16 / fp16 / fp32 arrays) against slow per-element
math on the array it stands for, torchrec's quantize_inference_model, fx + TorchScript, torch.export
with dynamic shapes, and an exported artifact loaded in a fresh process."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import PoolingType

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.modules.quant_robe_embedding_bag_collection import (
    QuantRobeEmbeddingBagCollection,
    robe_quantization_mapping,
)
from robe_torchrec.ops.stored_lookup import dequantize_rowwise_int8, quantize_rowwise_int8
from tests.slow_reference import bags_of, pooled_slow, weights_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORAGES = ["float32", "bfloat16", "float16", "int8"]


def mixed_dim_ebc(kernel: str, weighted: bool = False, **kwargs) -> RobeEmbeddingBagCollection:
    """Two arrays; group "a" holds dims 8 and 4 (two runs), so canonical order != torchrec's order."""
    tables = [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=100, feature_names=["f0"]),
        EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=100, feature_names=["f1", "f2"],
                           pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=100, feature_names=["f3"]),
    ]
    robe = {"a": RobeConfig(num_elements=101, block_size=4, seed=3), "b": RobeConfig(num_elements=77, block_size=8, seed=1)}
    torch.manual_seed(0)
    return RobeEmbeddingBagCollection(tables, robe, table_to_group={"t0": "a", "t1": "b", "t2": "a"},
                                      is_weighted=weighted, kernel=kernel, **kwargs)


def _two_group_ebc(weighted: bool = False) -> RobeEmbeddingBagCollection:
    ebc = mixed_dim_ebc("reference", weighted)
    with torch.no_grad():  # values of several magnitudes, so int8 rows have different scales
        for p in ebc.arrays.values():
            p.copy_(torch.randn(p.numel(), generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    return ebc


def _kjt(batch: int, weighted: bool, seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (4 * batch,), generator=g)
    n = int(lengths.sum())
    return KeyedJaggedTensor.from_lengths_sync(
        ["f0", "f1", "f2", "f3"], torch.randint(-(2**40), 2**40, (n,), generator=g), lengths,
        weights=torch.rand(n, generator=g) if weighted else None,
    )


def _stood_for(quant: QuantRobeEmbeddingBagCollection, group: int) -> torch.Tensor:
    """The float32 array that a stored group stands for (dequantised int8, or the upcast floats)."""
    lo, m, z, r = (quant._group_data_offsets[group], quant._group_elements[group],
                   quant._group_block_sizes[group], quant._group_row_offsets[group])
    data = quant.data[lo : lo + m]
    if quant.storage == "int8":
        return dequantize_rowwise_int8(data, quant.scale_bias[r : r + (m + z - 1) // z], z)
    return data.float()


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("batch", [1, 3])
def test_stored_lookup_matches_slow_math_on_the_array_it_stands_for(storage: str, batch: int) -> None:
    ebc = _two_group_ebc(weighted=True)
    quant = QuantRobeEmbeddingBagCollection.from_float(ebc, storage=storage)
    kjt = _kjt(batch, weighted=True, seed=batch)
    out = quant(kjt)
    assert out.keys() == ebc(kjt).keys()
    cols = []
    tables = {t.name: t for t in ebc.embedding_bag_configs()}
    for t_name, feature, group in [("t0", "f0", 0), ("t1", "f1", 1), ("t1", "f2", 1), ("t2", "f3", 0)]:
        t, cfg = tables[t_name], quant.robe_configs()[quant._groups[group]]
        spec = {"table": t_name, "dim": t.embedding_dim, "mean": t.pooling == PoolingType.MEAN,
                "ids": bags_of(kjt, feature), "weights": weights_of(kjt, feature)}
        cols.append(pooled_slow(_stood_for(quant, group), cfg.seed, cfg.block_size, [spec], batch))
    expected = torch.cat(cols, dim=1)
    # float32 accumulation of exactly representable stored values: only summation-order rounding
    torch.testing.assert_close(out.values().double(), expected, rtol=1e-5, atol=1e-6)


def test_int8_rowwise_quantization_error_is_within_half_a_step() -> None:
    x = torch.randn(1003, generator=torch.Generator().manual_seed(0))
    for z in (1, 4, 32):
        q, sb = quantize_rowwise_int8(x, z)
        assert q.dtype == torch.uint8 and sb.shape == ((1003 + z - 1) // z, 2)
        err = (dequantize_rowwise_int8(q, sb, z) - x).abs()
        step = sb[:, 0].repeat_interleave(z)[:1003]
        assert bool((err <= step / 2 + 1e-6).all()), float((err - step / 2).max())
    const = torch.full((8,), 0.25)
    q, sb = quantize_rowwise_int8(const, 4)  # a constant row is exact (scale 0)
    assert torch.equal(dequantize_rowwise_int8(q, sb, 4), const)


def _dlrm(ebc: RobeEmbeddingBagCollection) -> DLRM:
    torch.manual_seed(0)
    return DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[16, 8],
                over_arch_layer_sizes=[8, 1])


def _uniform_ebc() -> RobeEmbeddingBagCollection:
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=1000, feature_names=[f"f{i}"])
              for i in range(4)]
    return RobeEmbeddingBagCollection(tables, RobeConfig.from_compression(tables, ratio=10, block_size=4, seed=5))


def _inputs(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, generator=g), _kjt(batch, weighted=False, seed=seed)


def test_quantize_inference_model_converts_robe_and_scripts_after_fx() -> None:
    from torchrec.fx import symbolic_trace
    from torchrec.inference.modules import quantize_inference_model

    model = _dlrm(_uniform_ebc()).eval()
    quant = quantize_inference_model(copy.deepcopy(model), quantization_mapping=robe_quantization_mapping())
    qebc = quant.sparse_arch.embedding_bag_collection
    assert isinstance(qebc, QuantRobeEmbeddingBagCollection) and qebc.storage == "int8"
    assert qebc.data.dtype == torch.uint8
    dense, kjt = _inputs(6, 0)
    with torch.no_grad():
        float_out, quant_out = model(dense, kjt), quant(dense, kjt)
    # int8 rows of ~1e-2 magnitude: errors of ~1e-5 per element, far below the logits' scale
    torch.testing.assert_close(quant_out, float_out, rtol=0, atol=1e-3)
    traced = symbolic_trace(quant)
    scripted = torch.jit.script(traced)
    for b, s in ((6, 0), (2, 1)):
        dense, kjt = _inputs(b, s)
        torch.testing.assert_close(scripted(dense, kjt), quant(dense, kjt), rtol=0, atol=0)


@pytest.mark.parametrize("dtype,storage", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16"), (torch.qint8, "int8")])
def test_quantize_inference_model_dtype_selects_the_storage(dtype: torch.dtype, storage: str) -> None:
    from torchrec.inference.modules import quantize_inference_model

    quant = quantize_inference_model(_dlrm(_uniform_ebc()).eval(), quantization_mapping=robe_quantization_mapping(),
                                     quantization_dtype=dtype)
    assert quant.sparse_arch.embedding_bag_collection.storage == storage


def test_loading_another_layout_is_refused() -> None:
    quant = QuantRobeEmbeddingBagCollection.from_float(_uniform_ebc())
    tables = quant.embedding_bag_configs()
    other = QuantRobeEmbeddingBagCollection.from_float(
        RobeEmbeddingBagCollection(tables, RobeConfig.from_compression(tables, ratio=10, block_size=4, seed=6))
    )
    with pytest.raises(ValueError, match="different layout"):
        other.load_state_dict(quant.state_dict())


def test_export_with_dynamic_shapes_and_reload_in_a_fresh_process(tmp_path) -> None:
    from torchrec.inference.modules import quantize_inference_model

    from robe_torchrec.export import export_model, load_exported, robe_layouts, save_exported

    model = quantize_inference_model(_dlrm(_uniform_ebc()).eval(), quantization_mapping=robe_quantization_mapping())
    program = export_model(model, _inputs(5, 0))
    for b, s in ((5, 0), (9, 1), (1, 2)):  # other batch sizes and id counts than the example
        dense, kjt = _inputs(b, s)
        torch.testing.assert_close(program.module()(dense, kjt), model(dense, kjt), rtol=0, atol=0)
    path = str(tmp_path / "model.pt2")
    save_exported(program, path)
    dense, kjt = _inputs(7, 3)
    torch.save({"dense": dense, "values": kjt.values(), "lengths": kjt.lengths(), "eager": model(dense, kjt)},
               tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        from torchrec import KeyedJaggedTensor
        from robe_torchrec.export import load_exported
        from tests.no_unpickling import no_unpickling
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        kjt = KeyedJaggedTensor.from_lengths_sync(["f0", "f1", "f2", "f3"], io["values"], io["lengths"])
        with no_unpickling():  # any torch.load / pickle.load(s) / Unpickler raises
            served = load_exported({path!r}).module()
        out = served(io["dense"], kjt)
        assert torch.equal(out, io["eager"]), (out - io["eager"]).abs().max()
        import sys
        assert "robe_torchrec.train" not in sys.modules and "robe_torchrec.app" not in sys.modules
        print("fresh process OK")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "fresh process OK" in run.stdout, run.stderr[-3000:]
    # the artifact carries its layout: serving it under another one is refused
    layout = robe_layouts(model)
    assert load_exported(path, expected_layout=layout) is not None
    other = {k: [dict(g, seed=g["seed"] + 1) for g in v] for k, v in layout.items()}
    with pytest.raises(ValueError, match="expected"):
        load_exported(path, expected_layout=other)


def _rewrite_archive(src: str, dst: str, edit) -> None:
    """Copy a zip archive entry by entry; ``edit(name, data)`` returns new bytes, or None to drop it."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info, data)


def test_artifact_loads_without_unpickling_and_pickling_archives_are_refused(tmp_path) -> None:
    """load_exported never needs an unpickler (guarded: torch.load / pickle raise), while torch's own
    save of the same program does need one (its KJT example inputs), and load_exported refuses that
    archive, a pickled weight and an unknown entry before torch.export.load reads anything."""
    import json

    from torchrec.inference.modules import quantize_inference_model

    from robe_torchrec.export import LAYOUT_FILE, ArtifactError, export_model, load_exported, save_exported
    from tests.no_unpickling import no_unpickling

    model = quantize_inference_model(_dlrm(_uniform_ebc()).eval(), quantization_mapping=robe_quantization_mapping())
    program = export_model(model, _inputs(4, 0))
    good = str(tmp_path / "good.pt2")
    save_exported(program, good)
    assert program.example_inputs is not None  # the caller's program keeps its examples
    dense, kjt = _inputs(3, 5)
    with no_unpickling():
        served = load_exported(good).module()
    torch.testing.assert_close(served(dense, kjt), model(dense, kjt), rtol=0, atol=0)

    # torch.export.save keeps the pickled KeyedJaggedTensor example inputs: torch's loader unpickles them
    plain = str(tmp_path / "plain.pt2")
    torch.export.save(program, plain, extra_files={LAYOUT_FILE: json.dumps({})})
    with no_unpickling():
        with pytest.raises(AssertionError, match="must not unpickle"):
            torch.export.load(plain)
        with pytest.raises(ArtifactError, match="pickled example inputs"):
            load_exported(plain)

    def pickled_weight(name: str, data: bytes) -> bytes:
        if not name.endswith("_weights_config.json"):
            return data
        config = json.loads(data)
        first = next(iter(config["config"]))
        config["config"][first]["use_pickle"] = True
        return json.dumps(config).encode()

    crafted = str(tmp_path / "crafted.pt2")
    _rewrite_archive(good, crafted, pickled_weight)
    with no_unpickling(), pytest.raises(ArtifactError, match="stored as a pickled object"):
        load_exported(crafted)
    extra_entry = str(tmp_path / "extra_entry.pt2")
    _rewrite_archive(good, extra_entry, lambda name, data: data)
    import zipfile

    with zipfile.ZipFile(extra_entry, "a") as z:
        root = z.namelist()[0].split("/", 1)[0]
        z.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    with no_unpickling(), pytest.raises(ArtifactError, match="unexpected entry data/aotinductor"):
        load_exported(extra_entry)


@pytest.mark.slow
def test_int8_model_loses_at_most_0_001_auc_on_the_planted_benchmark() -> None:
    from robe_torchrec.bench.serving import main

    rows = {r["format"].split(" (")[0]: r for r in main(["--config", os.path.join(ROOT, "configs", "synthetic_small.yaml"),
                                                         "--steps", "150", "--iters", "1"])}
    fp32 = rows["ROBE fp32"]["auc"]
    assert fp32 > 0.7  # it learned: the comparison means something
    assert rows["QuantRobe float32"]["auc"] == pytest.approx(fp32, abs=1e-6)
    for storage in ("bfloat16", "float16", "int8"):
        assert abs(rows[f"QuantRobe {storage}"]["auc"] - fp32) <= 0.001, (storage, rows)
    assert rows["QuantRobe int8"]["embedding_bytes"] < 0.45 * rows["ROBE fp32"]["embedding_bytes"]


@pytest.mark.parametrize("storage", STORAGES)
def test_cpu_kernel_reads_every_storage_like_slow_math(storage: str, monkeypatch) -> None:
    """One array, one dim: the op takes the C++ kernel (pooled_forward_stored); MEAN and SUM tables."""
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=50, feature_names=[f"f{i}"],
                                 pooling=PoolingType.MEAN if i % 2 else PoolingType.SUM) for i in range(4)]
    ebc = RobeEmbeddingBagCollection(tables, RobeConfig(num_elements=61, block_size=4, seed=9), kernel="reference")
    with torch.no_grad():
        ebc.arrays["default"].copy_(torch.randn(61, generator=torch.Generator().manual_seed(1)))
    quant = QuantRobeEmbeddingBagCollection.from_float(ebc, storage=storage)
    kjt = _kjt(5, weighted=False, seed=7)
    fast = quant(kjt).values()
    specs = [{"table": f"t{i}", "dim": 8, "mean": bool(i % 2), "ids": bags_of(kjt, f"f{i}"), "weights": None}
             for i in range(4)]
    expected = pooled_slow(_stood_for(quant, 0), 9, 4, specs, 5)
    torch.testing.assert_close(fast.double(), expected, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("ROBE_STORED_LOOKUP_REFERENCE", "1")
    torch.testing.assert_close(quant(kjt).values(), fast, rtol=1e-6, atol=1e-7)


def _criteo_tsv(path, n: int, seed: int) -> None:
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        dense = [str(rng.randrange(100)) if rng.random() > 0.1 else "" for _ in range(13)]
        cats = [f"{rng.getrandbits(32):08x}" if rng.random() > 0.1 else "" for _ in range(26)]
        lines.append("\t".join(dense + cats))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_checkpoint_to_artifact_then_evaluate_and_predict_without_training_code(tmp_path) -> None:
    from robe_torchrec.evaluate import run_evaluate, run_predict
    from robe_torchrec.export_checkpoint import export_checkpoint
    from robe_torchrec.app.config import load_config
    from robe_torchrec.train import main as train_main

    config = os.path.join(ROOT, "configs", "synthetic_small.yaml")
    over = [f"logging.dir={tmp_path}", "logging.progress=false", "train.steps=20", "eval.batches=4"]
    train_main(["--config", config, "--set", *over])
    artifact = export_checkpoint(config, None, str(tmp_path / "model.pt2"), storage="float32", overrides=over)
    cfg = load_config(config, over)
    expected = run_evaluate(cfg, None, None)
    tsv = tmp_path / "test.txt"
    _criteo_tsv(tsv, 45, seed=2)
    run_predict(cfg, None, [str(tsv)], str(tmp_path / "ckpt_preds.txt"), batch_size=16)

    script = textwrap.dedent(f"""
        import json, sys
        from robe_torchrec.app.config import load_config
        from robe_torchrec.app.data import eval_batches
        from robe_torchrec.serve import evaluate_exported, predict_exported
        cfg = load_config({config!r}, {over!r})
        print(json.dumps(evaluate_exported({artifact!r}, eval_batches(cfg))))
        predict_exported({artifact!r}, [{str(tsv)!r}], {str(tmp_path / 'art_preds.txt')!r}, batch_size=16)
        loaded = [m for m in sys.modules if m.startswith("robe_torchrec.")]
        for training in ("robe_torchrec.train", "robe_torchrec.app.model", "robe_torchrec.app.checkpoint",
                         "robe_torchrec.sharding", "robe_torchrec.evaluate", "robe_torchrec.optim",
                         "robe_torchrec.optim_in_backward", "robe_torchrec.modules", "robe_torchrec.export",
                         "robe_torchrec.ops.lookup", "robe_torchrec.conversion"):
            assert training not in loaded, (training, loaded)
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    got = json.loads(run.stdout.strip().splitlines()[-2])
    assert got["num_samples"] == expected["num_samples"]
    assert got["auc"] == pytest.approx(expected["auc"], abs=1e-6)
    assert got["logloss"] == pytest.approx(expected["logloss"], rel=1e-5)
    art = [float(x) for x in (tmp_path / "art_preds.txt").read_text().split()]
    ckpt = [float(x) for x in (tmp_path / "ckpt_preds.txt").read_text().split()]
    assert len(art) == 45 and art == pytest.approx(ckpt, abs=2e-6)
    # and the CLI: python -m robe_torchrec.evaluate --exported
    cli_run = subprocess.run([sys.executable, "-m", "robe_torchrec.evaluate", "--config", config, "--set", *over,
                              "--exported", artifact], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cli_run.returncode == 0, cli_run.stderr[-2000:]
    assert json.loads(cli_run.stdout.strip().splitlines()[-1])["auc"] == pytest.approx(expected["auc"], abs=1e-6)


def test_evaluate_cli_names_a_missing_or_foreign_artifact(tmp_path, capsys) -> None:
    from robe_torchrec.evaluate import cli

    config = os.path.join(ROOT, "configs", "synthetic_small.yaml")
    assert cli(["--config", config, "--exported", str(tmp_path / "nope.pt2")]) == 1
    assert "nope.pt2: no such serving artifact" in capsys.readouterr().err
    (tmp_path / "text.pt2").write_text("not an archive")
    assert cli(["--config", config, "--exported", str(tmp_path / "text.pt2")]) == 1
    assert "text.pt2: not a torch.export archive" in capsys.readouterr().err
