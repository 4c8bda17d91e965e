"""MetaHeac: its forward against a reference written from the paper's structure, the critics'
log-space mixture, the meta-learning training step (query rows under adapted task
embeddings) against a step written out by hand, train vs eval, bfloat16 autocast, the
published parameter count against MTReclib's, bad options, and a short seeded fit.

The generic backbone tests (shapes, gradients dense and sparse, norms, roles, the planted
signal with a plain loop) cover MetaHeac through ``model_fixtures.SMALL_BACKBONES``.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

import mtl_clippy.models as models
from model_fixtures import adam_partial, auc, backbone_config, clippy_partial, make_planted
from mtl_clippy.config_checks import check_config
from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.errors import ConfigError
from mtl_clippy.models import MultiTaskModule

META = DatasetMetadata(vocab_sizes=tuple(range(5, 21)))
CONFIG = Path(__file__).parents[1] / "configs" / "model" / "metaheac.yaml"


def small(meta: DatasetMetadata = META, **overrides) -> models.MetaHeac:
    cfg = backbone_config("MetaHeac", **overrides)
    cfg.pop("_target_")
    return models.MetaHeac(meta, **cfg)


def rows(n: int, seed: int = 0, meta: DatasetMetadata = META):
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, v, (n,), generator=g) for v in meta.vocab_sizes], dim=1)
    num = torch.rand(n, meta.n_numerical, generator=g)
    labels = (torch.rand(n, meta.n_tasks, generator=g) < 0.3).float()
    return cat, num, labels


def bce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The module's training loss with equal task weights: the sum of the task BCEs."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0).sum()


def reference_probabilities(model: models.MetaHeac, cat, num, tasks=None) -> torch.Tensor:
    """MetaHeac's probabilities written out task by task from its modules (no batching of
    the tasks, no log space): gate input [e_t, mean of the field vectors], expert mixture,
    critic probabilities weighted by the critic gate."""
    fields = model.embedding(cat, num)
    x, summary = fields.flatten(1), fields.mean(1)
    experts = [e(x) for e in model.experts]
    tasks = model.task_embedding.weight if tasks is None else tasks
    out = []
    for t in range(model.n_tasks):
        gate_in = torch.cat([tasks[t].expand(len(cat), -1), summary], dim=1)
        a = torch.softmax(model.expert_gate(gate_in), dim=1)
        h = sum(a[:, [k]] * experts[k] for k in range(len(experts)))
        w = torch.softmax(model.critic_gate(gate_in), dim=1)
        p = torch.cat([torch.sigmoid(c(h)) for c in model.critics], dim=1)
        weighted = w * p
        out.append(weighted.mean(1) if model.critic_output == "mean" else weighted.sum(1))
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------- the forward


@pytest.mark.parametrize("critic_output", ["mixture", "mean"])
def test_forward_matches_the_reference_written_task_by_task(critic_output):
    torch.manual_seed(0)
    model = small(critic_output=critic_output).double().eval()
    cat, num, _ = rows(50)
    with torch.no_grad():
        ours = torch.sigmoid(model(cat, num.double()))
        theirs = reference_probabilities(model, cat, num.double())
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    if critic_output == "mean":  # MTReclib's average can never exceed 1 / n_critics
        assert (ours <= 1 / len(model.critics)).all()


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 6),
    st.sampled_from(["mixture", "mean"]),
    st.data(),
)
def test_critic_mixture_logit_is_the_logit_of_the_weighted_probability(c, output, data):
    """logit(sum_j w_j sigmoid(s_j)) (or of its mean over the critics), in float64, against
    the naive formula; finite with finite gradients where p rounds to 0 or 1."""
    floats = st.floats(-30, 30, allow_nan=False)
    gate = torch.tensor(data.draw(st.lists(floats, min_size=c, max_size=c)), dtype=torch.float64)
    scores = torch.tensor(data.draw(st.lists(floats, min_size=c, max_size=c)), dtype=torch.float64)
    model = small(n_critics=c, critic_output=output)
    log_w = torch.log_softmax(gate, dim=-1)
    ours = model._mixture_logit(log_w, scores)
    w = log_w.exp()
    p = (w * torch.sigmoid(scores)).sum()
    # 1 - p from the complements (sum w = 1), accurate where p is within ulps of 1
    q = (w * torch.sigmoid(-scores)).sum()
    if output == "mean":
        p, q = p / c, ((c - 1) + q) / c
    if p > 1e-300 and q > 1e-300:
        torch.testing.assert_close(ours, torch.log(p) - torch.log(q), rtol=1e-6, atol=1e-6)
    extreme = (scores * 20).requires_grad_()
    out = model._mixture_logit(log_w, extreme)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(extreme.grad).all()


def test_roles_of_its_parts():
    model = small()
    role = {n: r for r, pairs in model.parameter_roles().items() for n, _ in pairs}
    assert role["task_embedding.weight"] == "gates"
    assert {role[n] for n in role if n.startswith(("expert_gate.", "critic_gate."))} == {"gates"}
    assert {role[n] for n in role if n.startswith("experts.")} == {"bottom"}
    assert {role[n] for n in role if n.startswith("critics.")} == {"towers"}
    assert role["embedding.table.weight"] == "embeddings"


def test_published_size_is_mtreclibs_parameter_count():
    """MTReclib's MetaHeac at its main.py settings (embed_dim 128, 8 experts (512, 256),
    5 critics (128, 64) -> 1, BatchNorm in every hidden block, a task embedding per task),
    counted layer by layer from those settings, on 16 fields of 200 rows and 63 numerical
    features: ours has exactly as many parameters."""
    d, fields, tasks = 128, 16, 2
    linear = lambda i, o: i * o + o  # noqa: E731
    block = lambda i, o: linear(i, o) + 2 * o  # Linear + BatchNorm1d  # noqa: E731
    expert = block((fields + 1) * d, 512) + block(512, 256)
    critic = block(256, 128) + block(128, 64) + linear(64, 1)
    mtreclib = (
        fields * 200 * d  # embedding table
        + linear(63, d)  # numerical layer
        + tasks * d  # task embedding
        + 8 * expert
        + 5 * critic
        + linear(2 * d, 8)  # expert gate
        + linear(2 * d, 5)  # critic gate
    )
    ours = models.MetaHeac(DatasetMetadata(vocab_sizes=(200,) * 16))
    assert sum(p.numel() for p in ours.parameters()) == mtreclib == 10_609_298


# ----------------------------------------------------------------------------- training step


@pytest.mark.parametrize("episodes", [1, 2, 3])
def test_training_outputs_are_the_query_rows_under_the_adapted_embedding(episodes):
    """Each episode's query half is scored with e' = e - inner_lr * grad_e(support loss),
    checked against that step written out by hand (eval mode: no dropout, fixed norms)."""
    torch.manual_seed(0)
    model = small(inner_lr=0.5, episodes=episodes).double().eval()
    cat, num, labels = rows(30)
    num = num.double()
    logits, targets = model.training_outputs(cat, num, labels.double(), bce_sum)
    cuts = [30 * k // episodes for k in range(episodes + 1)]
    e = model.task_embedding.weight
    expected, want_labels = [], []
    for start, stop in itertools.pairwise(cuts):
        mid = (start + stop) // 2
        s, q = slice(start, mid), slice(mid, stop)
        support = torch.logit(reference_probabilities(model, cat[s], num[s]))
        (grad,) = torch.autograd.grad(bce_sum(support, labels[s].double()), e)
        expected.append(reference_probabilities(model, cat[q], num[q], tasks=e - 0.5 * grad))
        want_labels.append(labels[q])
    torch.testing.assert_close(targets, torch.cat(want_labels).double())
    torch.testing.assert_close(torch.sigmoid(logits), torch.cat(expected), rtol=1e-8, atol=1e-10)
    # the adaptation matters at this inner_lr, and the outer gradient reaches every parameter
    plain = model(cat[15:], num[15:]) if episodes == 1 else None
    if plain is not None:
        assert not torch.allclose(logits, plain)
    bce_sum(logits, targets).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_the_outer_gradient_is_second_order():
    """The inner step stays in the graph: the critics' gradient differs from the one with
    the inner gradient detached (first-order MAML)."""
    torch.manual_seed(0)
    model = small(inner_lr=1.0, episodes=1).double().eval()
    cat, num, labels = rows(40)
    num, labels = num.double(), labels.double()

    def critic_grad(first_order: bool) -> torch.Tensor:
        model.zero_grad()
        e = model.task_embedding.weight
        (g,) = torch.autograd.grad(bce_sum(model(cat[:20], num[:20]), labels[:20]), e,
                                   create_graph=not first_order)  # fmt: skip
        adapted = e - 1.0 * (g.detach() if first_order else g)
        bce_sum(model(cat[20:], num[20:], task_embedding=adapted), labels[20:]).backward()
        return model.critics[0][0].weight.grad.clone()

    model.zero_grad()
    logits, targets = model.training_outputs(cat, num, labels, bce_sum)
    bce_sum(logits, targets).backward()
    ours = model.critics[0][0].weight.grad.clone()
    torch.testing.assert_close(ours, critic_grad(first_order=False))
    assert not torch.allclose(ours, critic_grad(first_order=True))


def test_small_batches_and_no_inner_step_fall_back_to_the_plain_forward():
    torch.manual_seed(0)
    model = small(episodes=4).eval()
    cat, num, labels = rows(7)
    with torch.no_grad():
        full = model(cat, num)
    # 7 rows: one episode of 7 (3 support, 4 query)
    logits, targets = model.training_outputs(cat, num, labels, bce_sum)
    assert logits.shape == (4, 2) and torch.equal(targets, labels[3:])
    # 3 rows cannot be cut: the forward on all of them
    logits, targets = model.training_outputs(cat[:3], num[:3], labels[:3], bce_sum)
    torch.testing.assert_close(logits, full[:3])
    assert torch.equal(targets, labels[:3])
    # inner_lr=0: the query halves under the learned embedding
    flat = small(episodes=1, inner_lr=0.0).eval()
    logits, _ = flat.training_outputs(cat[:6], num[:6], labels[:6], bce_sum)
    torch.testing.assert_close(logits, flat(cat[3:6], num[3:6]))


def test_train_step_and_eval_forward_differ_as_documented():
    """The module's training step takes its loss on the query rows under the adapted
    embedding; evaluation uses the learned embedding, and its forward ignores the mode's
    meta step (eval forward == forward with the learned e, passed explicitly)."""
    torch.manual_seed(0)
    module = MultiTaskModule(backbone=backbone_config("MetaHeac", inner_lr=0.5), metadata=META)
    cat, num, labels = rows(64)
    module.train()
    seen = {}
    original = module.backbone.training_outputs

    def spy(*args):
        seen["out"] = original(*args)
        return seen["out"]

    module.backbone.training_outputs = spy
    module.log = lambda *args, **kwargs: None  # no Trainer here to log to
    loss = module.training_step((cat, num, labels), 0)
    logits, targets = seen["out"]
    assert logits.shape == (32, 2)  # two episodes of 16 query rows
    torch.testing.assert_close(loss, module.training_loss(logits, targets))
    module.eval()
    with torch.no_grad():
        out = module(cat, num)
        explicit = module.backbone(cat, num, task_embedding=module.backbone.task_embedding.weight)
    torch.testing.assert_close(out, explicit)


def test_bf16_autocast_forward_and_training_step():
    """Under CPU bfloat16 autocast the logits are float32, finite and close to float32's;
    the meta step's second-order backward is finite too."""
    torch.manual_seed(0)
    model = small().eval()
    cat, num, labels = rows(64)
    with torch.no_grad():
        full = model(cat, num)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(cat, num)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(torch.sigmoid(half), torch.sigmoid(full), atol=0.03, rtol=0)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, targets = model.training_outputs(cat, num, labels, bce_sum)
        loss = bce_sum(logits.float(), targets)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ----------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("n_critics", 0, "n_critics must be a whole number >= 1, got 0"),
        ("n_experts", 0, "n_experts must be a whole number >= 1, got 0"),
        ("episodes", 0, "episodes must be a whole number >= 1, got 0"),
        ("episodes", 1.5, "episodes must be a whole number >= 1, got 1.5"),
        ("inner_lr", -1e-3, "inner_lr must be a finite number >= 0, got -0.001"),
        ("inner_lr", math.nan, "inner_lr must be a finite number >= 0, got nan"),
        ("critic_output", "sum", "critic_output must be one of ['mixture', 'mean'], got 'sum'"),
    ],
)
def test_a_bad_option_is_one_line_naming_it(option, value, message):
    with pytest.raises(ValueError) as err:
        small(**{option: value})
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("key", "value"),
    [("n_critics", 0), ("inner_lr", -1), ("episodes", 0), ("critic_output", "sum")],
)
def test_the_config_check_names_a_bad_metaheac_key(key, value):
    cfg = OmegaConf.create({"model": OmegaConf.load(CONFIG)})
    check_config(cfg)
    cfg.model[key] = value
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert str(err.value).startswith(f"model.{key}: expected ") and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- a short fit


@pytest.mark.parametrize("optimizer", ["adam", "clippy"])
def test_meta_training_learns_the_planted_signal(optimizer):
    """MTReclib-style meta training (two episodes a batch, inner step on the task
    embeddings) for 3 epochs of 2000 planted rows: the training loss falls and the
    validation AUC is well above chance on both tasks."""
    torch.manual_seed(0)
    data = make_planted(n_train=2000, n_val=1000)
    module = MultiTaskModule(
        backbone=backbone_config("MetaHeac"),  # the config's inner_lr and episodes
        metadata=data.metadata,
        optimizer=adam_partial() if optimizer == "adam" else clippy_partial(),
    )
    opt = module.build_optimizer()
    losses = []
    module.train()
    for _ in range(3):
        epoch = []
        for cat, num, labels in data.loader("train", batch_size=128, shuffle=True):
            logits, targets = module.backbone.training_outputs(
                cat, num, labels, module.training_loss
            )
            loss = module.training_loss(logits, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            epoch.append(loss.item())
        losses.append(float(np.mean(epoch)))
    module.eval()
    with torch.no_grad():
        cat, num, labels = data.val
        scores = module(cat, num).numpy()
    aucs = [auc(scores[:, t], labels[:, t].numpy()) for t in range(2)]
    print(f"MetaHeac {optimizer}: epoch losses {losses}, val AUC {aucs}")
    assert losses[-1] < losses[0], losses
    assert aucs[0] > 0.7 and aucs[1] > 0.65, aucs


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_trains_metaheac(tmp_path):
    """``python train.py model=metaheac trainer=ddp trainer.devices=2`` completes (gloo on
    CPU): the meta step's inner gradient stays on each rank, the outer one is all-reduced.
    (Its numbers are not compared with one process: each rank cuts its own half of the
    global batch into episodes, so the episodes differ from a single process's.)"""
    import json

    from app_helpers import DDP_COMMON, run_train

    res = run_train(
        [
            *DDP_COMMON,
            "trainer.max_epochs=1",
            "model=metaheac",
            "trainer=ddp",
            "trainer.devices=2",
            "data.batch_size=64",
            f"paths.log_dir={tmp_path}/outputs",
            f"paths.data_dir={tmp_path}/data",
        ],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 2700 // 128
    assert metrics["test"]["auc_click"] > 0.5


@pytest.mark.parametrize(
    ("batch", "episodes", "most"),
    [(256, 64, None), (256, 65, 64), (256, 1_000_000, 64), (8, 2, None), (3, 1, None), (3, 2, 1)],
)
def test_episodes_that_cannot_fit_the_batch_are_refused(batch, episodes, most):
    """meta_step cuts a batch into episodes of >= 4 rows and silently uses fewer where they
    do not fit: the config check refuses a value that a full batch cannot hold."""
    cfg = OmegaConf.create({"model": OmegaConf.load(CONFIG), "data": {"batch_size": batch}})
    cfg.model.episodes = episodes
    if most is None:
        check_config(cfg)
        return
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert str(err.value) == (
        f"model.episodes: {episodes} episodes of at least 4 rows do not fit in a batch of "
        f"data.batch_size={batch} rows; expected at most {most}, or a larger data.batch_size"
    )
