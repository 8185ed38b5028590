"""data.document_mask: attention stops at end-of-document tokens inside a packed sequence and
rotary positions restart at each document.

Equivalence, the definition of the feature: a document's logits in a packed batch equal its
logits when it is run alone (from position 0, no mask), at tp=1 and at tp=2 (+ sequence
parallelism). Tolerance 1e-5 absolute on logits of size ~1: the packed and the lone forward
multiply matrices of different shapes (b*s rows), so the sums are ordered differently; bitwise
is not what the math allows. Within one shape, every recompute mode under the mask is bitwise
equal to no recompute under the mask (same kernels, same inputs), as in test_recompute.py.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from bigtrain.config import ConfigError, ModelConfig, RecomputeConfig, load_config
from bigtrain.errors import UserError
from bigtrain.model import DocumentMask, build_model, document_ids, init_weights, positions_in_documents
from bigtrain.parallel.dims import ParallelDims
from bigtrain.parallel.loss import cross_entropy
from bigtrain.parallel.parallelize import parallelize
from bigtrain.parallel.random import seed_rng
from bigtrain.recompute import apply_recompute
from tests.conftest import TINY
from tests.multiproc import run_ranks
from tests.test_recompute import rc

EOS = 1
LOGIT_ATOL = 1e-5
DOCS = [[5, 6, 7, EOS], [8, 9, 10, 11, 12, 13, EOS], [14, 15, 16, 17, 18, EOS], [19, 20, 21]]  # 20 tokens


def model_cfg(dropout=0.0) -> ModelConfig:
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=64,
                       max_seq_len=64, dropout=dropout)


def test_document_ids_and_positions():
    tokens = torch.tensor([[3, EOS, 4, 5, EOS, EOS, 6], [EOS, 7, 8, 9, 10, 11, 12]])
    docs = document_ids(tokens, EOS)
    # an EOS belongs to the document it ends; an empty document (EOS EOS) is the EOS alone
    assert docs.tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    assert positions_in_documents(docs).tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 4, 5]]


def test_dense_mask_is_block_causal():
    docs = document_ids(torch.tensor([[3, EOS, 4, 5]]), EOS)
    mask = DocumentMask(docs, torch.float32).dense  # (1, 1, 4, 4)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert mask.dtype == torch.float32 and torch.isinf(mask[0, 0, 0, 1])


def _packed_and_alone(dims: ParallelDims, sp: bool = False):
    """Max |packed - alone| over each document's logits (this rank's vocab shard), and the same
    without the mask (which must differ, else the check could not tell)."""
    cfg = model_cfg()
    model = build_model(cfg)
    if dims.tp > 1:
        parallelize(model, dims, seed_rng(0, dims))
    init_weights(model, seed=0)
    model.eval()
    # two rows, the second with the documents in another order (and so at other offsets); the
    # last one, without an EOS, stays last (it would run into the next one)
    orders = [DOCS, [DOCS[2], DOCS[0], DOCS[1], DOCS[3]]]
    packed = torch.tensor([sum(order, []) for order in orders])  # (2, 20)
    with torch.no_grad():
        masked = model(packed, document_ids(packed, EOS))
        plain = model(packed)
        worst = unmasked = 0.0
        for r, order in enumerate(orders):
            start = 0
            for doc in order:
                # alone: pad to a multiple of tp for sequence parallelism (causal: padding after it changes nothing)
                alone_tokens = torch.tensor([doc + [0] * (-len(doc) % (2 * dims.tp))])
                alone = model(alone_tokens)[0, :len(doc)]
                worst = max(worst, (masked[r, start:start + len(doc)] - alone).abs().max().item())
                unmasked = max(unmasked, (plain[r, start:start + len(doc)] - alone).abs().max().item())
                start += len(doc)
    return worst, unmasked


def test_a_documents_logits_in_a_packed_batch_equal_its_logits_alone():
    worst, unmasked = _packed_and_alone(ParallelDims.single())
    assert worst <= LOGIT_ATOL, worst
    assert unmasked > 100 * LOGIT_ATOL  # without the mask, the later documents see the earlier ones


def _tp2_packed_and_alone(rank, world, sp):
    return _packed_and_alone(ParallelDims.build(world, rank, tp=2, sequence_parallel=sp), sp)


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_packed_logits_equal_alone(sp):
    for worst, unmasked in run_ranks(_tp2_packed_and_alone, 2, sp, timeout=120):
        assert worst <= LOGIT_ATOL, worst
        assert unmasked > 100 * LOGIT_ATOL


@pytest.mark.parametrize("s", [256, 300])
def test_flex_block_mask_matches_the_dense_mask(s):
    """The CUDA path (flex attention with a BlockMask) computes what the dense SDPA mask does;
    checked here with flex's CPU reference (forward only: flex has no CPU backward)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    cfg = model_cfg()
    core = build_model(cfg).layers[0].attention.core_attention
    g = torch.Generator().manual_seed(0)
    b = 2  # two or three 128-tiles per side (300: a ragged last one): whole masked tiles are skipped
    q = torch.randn(b, s, cfg.n_heads, cfg.head_dim, generator=g)
    k, v = (torch.randn(b, s, cfg.kv_heads, cfg.head_dim, generator=g) for _ in range(2))
    tokens = torch.randint(2, 60, (b, s), generator=g)
    tokens[0, [40, 129, 200]] = EOS
    tokens[1, [127]] = EOS
    docs = document_ids(tokens, EOS)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex's "called without torch.compile" (the CPU reference)
        flex = core(q, k, v, DocumentMask(docs, torch.float32, flex=True))
    dense = core(q, k, v, DocumentMask(docs, torch.float32))
    torch.testing.assert_close(flex, dense, rtol=0, atol=1e-5)


MODES = {
    "full": rc(granularity="full"),
    "full_block2": rc(granularity="full", method="block", num_layers=2),
    "selective_all": rc(granularity="selective", modules=["norm", "core_attn", "mlp"]),
    "selective_mlp_act": rc(granularity="selective", modules=["mlp_act"]),
    "pointwise": rc(granularity="selective", modules=["pointwise"]),
    "pointwise_core_attn": rc(granularity="selective", modules=["pointwise", "core_attn"]),
    "offload": rc(offload=True),
    "full_offload": rc(granularity="full", offload=True),
    "pointwise_offload": rc(granularity="selective", modules=["pointwise"], offload=True),
}
MODES_TP2 = {**{k: MODES[k] for k in ("full", "selective_all", "pointwise", "full_offload")},
             "full_partition": rc(granularity="full", partition=True)}


def run_masked(dims: ParallelDims, r: RecomputeConfig, sp: bool = False):
    """Loss and gradients of one forward/backward under the mask (dropout 0.1: replays must
    draw the forward's masks) with recompute policy r."""
    cfg = model_cfg(dropout=0.1)
    rng = seed_rng(7, dims)
    model = build_model(cfg)
    parallelize(model, dims, rng)
    apply_recompute(model, dims, r, rng=rng)
    init_weights(model, seed=0)
    tokens = torch.randint(2, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(3))
    tokens[0, [5, 17]] = EOS
    tokens[1, [9]] = EOS
    x, y = tokens[:, :-1], tokens[:, 1:]
    loss = cross_entropy(model(x, document_ids(x, EOS)), y, dims.tp_group, cfg.vocab_size)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_bitwise(got, ref, mode):
    assert torch.equal(got[0], ref[0]), (mode, got[0], ref[0])
    for name in ref[1]:
        assert torch.equal(got[1][name], ref[1][name]), (mode, name)


@pytest.mark.parametrize("mode", list(MODES))
def test_recompute_modes_are_bitwise_equal_under_the_mask(mode):
    ref = run_masked(ParallelDims.single(), rc())
    assert_bitwise(run_masked(ParallelDims.single(), MODES[mode]), ref, mode)


def _tp2_modes(rank, world, sp):
    dims = ParallelDims.build(world, rank, tp=2, sequence_parallel=sp)
    ref = run_masked(dims, rc(), sp)
    modes = {k: v for k, v in MODES_TP2.items() if not (sp and k == "full_partition")}
    for mode, r in modes.items():
        assert_bitwise(run_masked(dims, r, sp), ref, mode)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_recompute_modes_are_bitwise_equal_under_the_mask(sp):
    assert run_ranks(_tp2_modes, 2, sp, timeout=240) == [True, True]


def test_the_mask_is_not_kept_per_block():
    """The mask and the per-token rotary angles are held once for the step, not as each
    block's activations (nor offloaded once per block)."""
    from bigtrain.recompute import ActivationAccountant

    def kept(documents: bool, r: RecomputeConfig) -> int:
        cfg = model_cfg()
        model = init_weights(apply_recompute(build_model(cfg), ParallelDims.single(), r), seed=0)
        tokens = torch.randint(2, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
        tokens[:, 10] = EOS
        with ActivationAccountant(model) as acc:
            model(tokens, document_ids(tokens, EOS) if documents else None)
        return acc.report.blocks  # label -> BlockBytes(device, host)

    for r in (rc(), rc(offload=True), rc(granularity="selective", modules=["pointwise"])):
        assert kept(True, r) == kept(False, r)


# ------------------------------------------------------------------------------------------
# The trainer


@pytest.fixture(scope="module")
def documents_data(tiny_data, tmp_path_factory):
    """Many short documents (a .jsonl line each), encoded with tiny_data's tokenizer."""
    from bigtrain.data.prepare import prepare

    root = tmp_path_factory.mktemp("docs")
    corpus = root / "docs.jsonl"
    words = ["the king", "a rose", "my lord", "sweet love", "the night", "good sir", "fair day"]
    with corpus.open("w") as f:
        for i in range(600):
            text = " ".join(words[(i * j) % len(words)] for j in range(1 + i % 9))
            f.write(json.dumps({"text": text}) + "\n")
    out = root / "prepared"
    prepare([str(corpus)], str(out), tokenizer=str(tiny_data / "tokenizer.model"), workers=1)
    return out


def _trainer_cfg(data, out, *extra):
    return load_config("configs/debug.yaml", [*TINY, f"data.path={data}", f"train.out_dir={out}", "train.steps=6",
                                              "train.save_every=0", "train.eval_every=3", *extra])


def test_trainer_trains_under_the_mask(documents_data, tmp_path):
    from bigtrain.trainer import Trainer

    meta = json.loads((documents_data / "meta.json").read_text())
    trainer = Trainer(_trainer_cfg(documents_data, tmp_path / "run", "data.document_mask=true"))
    batch = trainer.train_loader.next_batch()
    assert (batch == meta["eos_id"]).sum() >= batch.shape[0]  # the windows hold several documents
    records = trainer.train()
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert any("val_loss" in r for r in records)
    # and the mask changes what is computed: the same run without it has other losses
    plain = Trainer(_trainer_cfg(documents_data, tmp_path / "plain")).train()
    assert [r["loss"] for r in plain if "loss" in r][0] != losses[0]


def test_document_mask_needs_an_eos_id(tiny_data, tmp_path):
    from bigtrain.trainer import Trainer

    data = tmp_path / "no_eos"
    shutil.copytree(tiny_data, data)
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "eos_id": -1}))
    with pytest.raises(UserError, match="data.document_mask=true needs an end-of-document id"):
        Trainer(_trainer_cfg(data, tmp_path / "run", "data.document_mask=true"))


def test_document_mask_is_a_boolean_key(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="document_mask"):
        _trainer_cfg(tiny_data, tmp_path / "run", "data.document_mask=maybe")


@pytest.mark.parametrize("s", [128, 256, 300, 517])
def test_block_mask_from_tiles_is_the_block_causal_mask(s):
    """The BlockMask made from each tile's first and last document equals, tile for tile, the
    one torch's create_block_mask derives from the full mask (which it builds: b x s x s), and
    says "full" only where every entry is allowed; ragged lengths included."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention.flex_attention import create_block_mask

    from bigtrain.model import _block_mask

    g = torch.Generator().manual_seed(s)
    tokens = torch.randint(2, 60, (3, s), generator=g)
    tokens[0, torch.randint(0, s, (6,), generator=g)] = EOS  # several documents
    tokens[1, 0] = EOS  # row 2: one document; row 1: an EOS first
    docs = document_ids(tokens, EOS)
    ours = _block_mask(docs)

    def same_document_causal(b, h, q, k):
        return (k <= q) & (docs[b, q] == docs[b, k])

    ref = create_block_mask(same_document_causal, 3, None, s, s, device="cpu")
    assert torch.equal(ours.to_dense(), ref.to_dense())  # which tiles are computed at all
    dense = (docs[:, :, None] == docs[:, None, :]) & torch.ones(s, s, dtype=torch.bool).tril()  # (b, s, s)
    n = -(-s // 128)
    for b in range(3):
        full = torch.zeros(n, n, dtype=torch.bool)
        for q in range(n):
            for i in range(int(ours.full_kv_num_blocks[b, 0, q])):
                full[q, ours.full_kv_indices[b, 0, q, i]] = True
        for q, k in full.nonzero().tolist():
            assert dense[b, q * 128:(q + 1) * 128, k * 128:(k + 1) * 128].all(), (b, q, k)
