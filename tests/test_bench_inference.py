"""The inference benchmark's free-embedding side computes the same model as the ROBE side."""

import torch

from robe_torchrec import RobeConfig, RobeEmbeddingBagCollection
from robe_torchrec.bench import inference


def test_free_embedding_model_equals_robe_model_on_its_batch():
    dense, kjt = inference.make_batch(8, 10_000, torch.device("cpu"))
    cfg = RobeConfig.from_compression(inference.tables(1, 16), ratio=1000.0, block_size=8)
    torch.manual_seed(0)
    robe = RobeEmbeddingBagCollection(inference.tables(10_000, 16), cfg)
    torch.manual_seed(1)
    robe_model = inference.dlrm_dcn(robe, 16, torch.device("cpu"), quick=True)
    with torch.no_grad():
        free = inference.FreeEmbedding(robe.embedding_bag_configs(), robe(kjt))
    torch.manual_seed(1)
    free_model = inference.dlrm_dcn(free, 16, torch.device("cpu"), quick=True)
    with torch.no_grad():
        torch.testing.assert_close(free_model(dense, kjt), robe_model(dense, kjt))


def test_quick_run_reports_every_side_against_the_bound(capsys):
    results = inference.run(["--quick", "--iters", "1", "--warmup", "0", "--precision", "bf16"])
    assert {"robe", "full", "free"} <= set(results)
    assert results["free"]["mbytes"] == 0.0 and results["robe"]["mbytes"] > 0
    assert "free-embedding bound" in capsys.readouterr().out
