"""dpfl's local solvers: convergence, state size per role, the spec's specific checks."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpfl.config import OptimizerConfig
from dpfl.errors import ConfigError
from dpfl.models import SmallCNN
from dpfl.optim import OPTIMIZERS, create_optimizer
from dpfl.optim.muon import MuonHybrid, newton_schulz5
from dpfl.optim.roles import assign_roles, role_param_groups
from dpfl.optim.scale import SCALE, colnorm
from dpfl.optim.sgd_sai import SGDSaI
from dpfl.optim.state_size import ProbeModel, state_bytes_per_param
from dpfl.privacy import make_private

# learning rates under DP (digits) and without DP (the synthetic task below)
NEW = {
    "sgd-sai": 0.5,
    "scale": 0.01,
    "muon": 0.02,
    "swan": 0.003,
    "sinkgd": 0.003,
    "frugal": 0.003,
    "conda": 0.003,
    "auon": 0.02,
    "hybrid-auon": 0.02,
    "drop-muon": 0.02,
}
PLAIN_LR = {
    "sgd-sai": 0.05,
    "scale": 0.003,
    "muon": 0.02,
    "swan": 0.003,
    "sinkgd": 0.003,
    "frugal": 0.003,
    "conda": 0.003,
    "auon": 0.02,
    "hybrid-auon": 0.02,
    "drop-muon": 0.02,
}


TinyLM = ProbeModel  # embedding, LayerNorm, hidden Linear, head: every role


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(256, 1, 8, 8, generator=g)
    w = torch.randn(64, 10, generator=g)
    return x, (x.flatten(1) @ w).argmax(1)


@pytest.mark.parametrize("name", sorted(NEW))
def test_reduces_the_loss(name):
    torch.manual_seed(0)
    model = SmallCNN()
    opt = create_optimizer(OptimizerConfig(name=name, lr=PLAIN_LR[name]), model)
    x, y = data()
    first = float(F.cross_entropy(model(x), y).detach())
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert float(F.cross_entropy(model(x), y).detach()) < 0.5 * first


def step_once(opt, model):
    opt.zero_grad()
    model(torch.randint(0, 20, (8, 5))).sum().backward()
    opt.step()


@pytest.mark.parametrize(
    "name,expected",
    [
        ("scale", {"hidden": 0, "embedding": 0, "head": 4, "vector": 8}),
        ("muon", {"hidden": 4, "embedding": 8, "head": 8, "vector": 8}),
        ("sgd-sai", {"hidden": 4, "embedding": 4, "head": 4, "vector": 4}),
        ("swan", {"hidden": 0, "embedding": 8, "head": 8, "vector": 8}),
        ("sinkgd", {"hidden": 0, "embedding": 8, "head": 8, "vector": 8}),
        ("auon", {"hidden": 4, "embedding": 8, "head": 8, "vector": 8}),
        ("hybrid-auon", {"hidden": 4, "embedding": 8, "head": 8, "vector": 8}),
        # one hidden tensor: round(0.25 * 1) = 1 active block holding Adam's 8 bytes
        ("frugal", {"hidden": 8, "embedding": 8, "head": 8, "vector": 8}),
        # m and v (8) + the 16 x 16 rotation of the (32 x 16) hidden matrix: 4 * 256 / 512 = 2
        ("conda", {"hidden": 10, "embedding": 8, "head": 8, "vector": 8}),
    ],
)
def test_state_bytes_per_param_match_the_spec_table(name, expected):
    torch.manual_seed(0)
    model = TinyLM()
    opt = create_optimizer(OptimizerConfig(name=name, lr=0.01, momentum=0.9), model)
    step_once(opt, model)
    assert state_bytes_per_param(opt, model) == expected


def test_roles_on_a_cnn_and_on_a_peft_lora_model():
    assert assign_roles(SmallCNN()) == {
        "features.0.weight": "hidden",
        "features.0.bias": "vector",
        "features.1.weight": "vector",
        "features.1.bias": "vector",
        "features.4.weight": "hidden",
        "features.4.bias": "vector",
        "features.5.weight": "vector",
        "features.5.bias": "vector",
        "classifier.1.weight": "hidden",
        "classifier.1.bias": "vector",
        "classifier.3.weight": "head",
        "classifier.3.bias": "vector",
    }
    from peft import LoraConfig, get_peft_model

    base = nn.Sequential()
    base.add_module("query", nn.Linear(8, 8))
    base.add_module("act", nn.ReLU())
    base.add_module("classifier", nn.Linear(8, 2))
    lora = get_peft_model(
        base, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"])
    )
    roles = assign_roles(lora)
    assert {r for n, r in roles.items() if "lora_" in n} == {"hidden"}
    assert [n for n, r in roles.items() if r == "head"] == [
        "base_model.model.classifier.modules_to_save.default.weight"
    ]
    assert all("base_layer" not in n for n in roles)  # frozen weights get no role


# -- SCALE ---------------------------------------------------------------------------------------
def test_scale_normalizes_each_output_unit_and_embeddings_per_dimension():
    g = torch.randn(6, 10) * torch.arange(1, 7).float()[:, None]
    rows = colnorm(g, dim=1)
    assert torch.allclose(rows.pow(2).mean(1), torch.ones(6), atol=1e-5)
    cols = colnorm(g, dim=0)
    assert torch.allclose(cols.pow(2).mean(0), torch.ones(10), atol=1e-5)
    conv = torch.randn(4, 3, 3, 3)
    assert torch.allclose(colnorm(conv).reshape(4, -1).pow(2).mean(1), torch.ones(4), atol=1e-5)


def test_scale_hidden_step_is_lr_times_colnorm_and_head_uses_momentum():
    torch.manual_seed(0)
    model = TinyLM()
    before = copy.deepcopy(model)
    opt = SCALE(role_param_groups(model), lr=0.1, momentum=0.9)
    step_once(opt, model)
    g = model.hidden.weight.grad
    assert torch.allclose(model.hidden.weight, before.hidden.weight - 0.1 * colnorm(g), atol=1e-6)
    # head: m = 0.1 g after one step, colnorm is scale-free
    gh = model.head.weight.grad
    assert torch.allclose(
        model.head.weight, before.head.weight - 0.1 * colnorm(0.1 * gh), atol=1e-6
    )
    ge = model.emb.weight.grad
    assert torch.allclose(model.emb.weight, before.emb.weight - 0.1 * colnorm(ge, dim=0), atol=1e-6)


# -- SGD-SaI: the three official versions --------------------------------------------------------
def official(params_grads, version, lr=0.1, beta=0.9, wd=0.01, eps=1e-8):
    """The official update of spec 1.2 for one step, written out per version."""

    def gsnr(g):
        if version == "v1.1.0":
            return math.sqrt(g.numel())
        return float(g.norm() / (torch.nan_to_num(g.std()) + eps))

    scales = [gsnr(g) for _, g in params_grads]
    if version == "v1.0.4":
        scales = [s / max(scales) for s in scales]
    return [p * (1 - lr * wd) - lr * s * g for (p, g), s in zip(params_grads, scales, strict=True)]


@pytest.mark.parametrize(
    "version,gsnr,normalize",
    [("v1.0.3", "std", "none"), ("v1.0.4", "std", "max"), ("v1.1.0", "sqrt_numel", "none")],
)
def test_sgd_sai_modes_reproduce_the_official_versions(version, gsnr, normalize):
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(5, 7)), nn.Parameter(torch.randn(3))]
    for p in ps:
        p.grad = torch.randn_like(p)
    expected = official([(p.detach().clone(), p.grad.clone()) for p in ps], version)
    SGDSaI(ps, lr=0.1, gsnr=gsnr, normalize=normalize).step()
    for p, e in zip(ps, expected, strict=True):
        assert torch.allclose(p.detach(), e, atol=1e-6)


def test_sgd_sai_momentum_zero_and_one_element_tensors():
    scalar = nn.Parameter(torch.tensor([1.0]))
    matrix = nn.Parameter(torch.ones(4, 4))
    scalar.grad, matrix.grad = torch.tensor([0.5]), torch.full((4, 4), 0.1)
    opt = SGDSaI(
        [scalar, matrix], lr=0.1, momentum=0.0, weight_decay=0.0, gsnr="std", normalize="none"
    )
    opt.step()
    assert opt.state[scalar]["gsnr"] == 1.0  # official code: |g| / 1e-8
    assert float(scalar) == pytest.approx(1.0 - 0.1 * 0.5)
    assert "momentum_buffer" not in opt.state[matrix]


# -- Muon ----------------------------------------------------------------------------------------
def test_newton_schulz_nearly_orthogonalizes():
    torch.manual_seed(0)
    for shape in [(16, 48), (48, 16), (20, 20)]:
        o = newton_schulz5(torch.randn(*shape))
        s = torch.linalg.svdvals(o)
        assert float(s.min()) > 0.5 and float(s.max()) < 1.5, (shape, s)


def test_muon_hidden_update_equals_torch_optim_muon():
    torch.manual_seed(0)
    w1 = nn.Parameter(torch.randn(24, 40))
    w2 = nn.Parameter(w1.detach().clone())
    ours = MuonHybrid([{"params": [w1], "role": "hidden"}], lr=0.02, momentum=0.95)
    theirs = torch.optim.Muon([w2], lr=0.02, momentum=0.95, weight_decay=0.0)
    for _ in range(3):
        g = torch.randn(24, 40)
        w1.grad, w2.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    # torch runs Newton-Schulz in bfloat16, ours in float32
    assert torch.allclose(w1, w2, atol=2e-3)


def test_muon_handles_conv_filters():
    torch.manual_seed(0)
    model = SmallCNN()
    opt = create_optimizer(OptimizerConfig(name="muon", lr=0.02), model)
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert "momentum_buffer" in opt.state[model.features[4].weight]


# -- common --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(NEW))
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    model = TinyLM()
    opt = create_optimizer(OptimizerConfig(name=name, lr=0.01, momentum=0.9), model)
    step_once(opt, model)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    torch.manual_seed(1)
    step_once(opt, model)
    after = copy.deepcopy(model.state_dict())
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved_opt)
    torch.manual_seed(1)
    step_once(opt, model)
    assert all(torch.equal(after[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda ps: SGDSaI(ps, lr=-1.0), "lr must be"),
        (lambda ps: SGDSaI(ps, momentum=1.0), "momentum must be in"),
        (lambda ps: SGDSaI(ps, gsnr="magic"), "gsnr must be"),
        (lambda ps: SCALE(ps, momentum=-0.1), "momentum must be in"),
        (lambda ps: SCALE(ps, betas=(0.9, 1.0)), "beta2 must be in"),
        (lambda ps: MuonHybrid(ps, lr=0.0), "lr must be"),
        (lambda ps: MuonHybrid(ps, weight_decay=-1.0), "weight_decay must be"),
        (lambda ps: MuonHybrid(ps, ns_steps=0), "ns_steps must be"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(make, match):
    with pytest.raises(ConfigError, match=match):
        make([nn.Parameter(torch.ones(3, 3))])


def test_unknown_optimizer_name():
    with pytest.raises(ConfigError, match="unknown optimizer 'lbfgs'"):
        OPTIMIZERS.get("lbfgs")
    with pytest.raises(ConfigError, match="optimizer.name must be one of"):
        OptimizerConfig(name="lbfgs")


@pytest.mark.parametrize("backend", ["bk", "hooks"])
@pytest.mark.parametrize("name", sorted(NEW))
def test_every_optimizer_works_inside_the_private_step(name, backend):
    torch.manual_seed(0)
    model = SmallCNN()
    opt = create_optimizer(OptimizerConfig(name=name, lr=NEW[name]), model)
    x, y = data()
    pt = make_private(
        model,
        opt,
        DataLoader(TensorDataset(x, y), batch_size=64),
        noise_multiplier=1.0,
        grad_sample_mode=backend,
        seed=0,
    )
    before = [p.detach().clone() for p in pt.optimizer.params]
    pt.train_step(x[:64], y[:64], lambda o, t: F.cross_entropy(o, t, reduction="none"))
    changed = [not torch.equal(p, b) for p, b in zip(pt.optimizer.params, before, strict=True)]
    # drop-muon leaves a random prefix of the blocks untouched; the last block always moves
    assert changed[-1] and (all(changed) or name == "drop-muon")
    noise_vars = [g["dp_noise_var"] for g in opt.param_groups if "dp_noise_var" in g]
    assert all(v == pytest.approx((1.0 * 1.0 / 64) ** 2) for v in noise_vars)


# -- SinkGD, SWAN --------------------------------------------------------------------------------
def test_sinkhorn_reaches_the_row_and_column_norms_and_ignores_rescaling():
    from dpfl.optim.sinkgd import sr_sinkhorn

    torch.manual_seed(0)
    g = torch.randn(12, 30).double()
    x = sr_sinkhorn(g, iters=50)
    assert torch.allclose(x.norm(dim=1), torch.full((12,), math.sqrt(30)).double(), atol=1e-4)
    assert torch.allclose(x.norm(dim=0), torch.full((30,), math.sqrt(12)).double(), atol=1e-4)
    rescaled = g * torch.rand(12, 1).double().add(0.5) * torch.rand(1, 30).double().add(0.5)
    assert torch.allclose(sr_sinkhorn(rescaled, iters=50), x, atol=1e-4)


def test_swan_whitens_the_standardized_gradient():
    from dpfl.optim.swan import swan_direction

    torch.manual_seed(0)
    for shape in [(8, 40), (40, 8)]:
        g = torch.randn(*shape).double()
        d = swan_direction(g, ns_steps=30)
        wide = g if shape[0] <= shape[1] else g.T
        z = (wide - wide.mean(1, keepdim=True)) / wide.std(1, unbiased=False, keepdim=True)
        u, _, vh = torch.linalg.svd(z, full_matrices=False)
        expected = math.sqrt(wide.shape[1]) * (u @ vh)
        got = d if shape[0] <= shape[1] else d.T
        assert torch.allclose(got, expected, atol=1e-4)
        assert float(d.pow(2).mean().sqrt()) == pytest.approx(1.0, rel=1e-6)


# -- FRUGAL --------------------------------------------------------------------------------------
def test_frugal_blockwise_gives_every_hidden_tensor_exactly_one_rule_and_agrees_across_clients():
    from dpfl.optim.frugal import FRUGAL

    def active_sets(seed):
        torch.manual_seed(0)
        model = SmallCNN()
        opt = FRUGAL(role_param_groups(model), lr=1e-3, density=0.5, update_gap=2, seed=seed)
        x, y = data()
        sets = []
        for _ in range(6):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sets.append(frozenset(opt.active))
            hidden = opt.hidden_params()
            with_state = {id(p) for p in hidden if opt.state[p]}
            assert with_state == set(opt.active)  # Adam only on active tensors
            assert len(opt.active) == round(0.5 * len(hidden))
        return [sorted(i for i, p in enumerate(opt.hidden_params()) if id(p) in s) for s in sets]

    a, b = active_sets(seed=7), active_sets(seed=7)
    assert a == b  # same (seed, step) -> same active blocks on every client
    assert a[0] == a[1] and a[2] == a[3]  # fixed within an update period


@pytest.mark.parametrize("mode", ["svd", "random"])
def test_frugal_projection_split_covers_every_coordinate(mode):
    from dpfl.optim.frugal import FRUGAL

    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(10, 24))
    w.grad = torch.randn(10, 24)
    opt = FRUGAL([{"params": [w], "role": "hidden"}], lr=1e-3, mode=mode, density=0.25)
    opt.step()
    proj = opt.state[w]["projector"]
    assert torch.allclose(proj @ proj.T, torch.eye(proj.shape[0]), atol=1e-5)
    up, rest = FRUGAL.split(w.grad, proj, right=False)  # 10 x 24: the 10-row side is projected
    assert torch.allclose(up + rest, w.grad)
    assert torch.allclose(proj @ rest, torch.zeros(proj.shape[0], 24), atol=1e-5)


# -- Conda, AuON, Drop-Muon ----------------------------------------------------------------------
def test_conda_rotates_by_the_momentum_singular_vectors():
    from dpfl.optim.conda import Conda

    torch.manual_seed(0)
    for shape in [(20, 6), (6, 20)]:
        w = nn.Parameter(torch.randn(*shape))
        w.grad = torch.randn(*shape)
        opt = Conda([{"params": [w], "role": "hidden"}], lr=1e-3)
        opt.step()
        o = opt.state[w]["rotation"]
        assert torch.allclose(o @ o.T, torch.eye(6), atol=1e-5)
        assert opt.state[w]["exp_avg_sq"].shape == shape  # rotated g keeps its shape


def test_auon_cosh_factor_is_within_its_bound_and_the_update_has_unit_norm():
    from dpfl.optim.auon import AuON, auon_direction

    torch.manual_seed(0)
    for n, gamma in [(8, 1.0), (64, 1.0), (32, 1.5)]:
        u = torch.randn(n, n)
        o, r = auon_direction(u, gamma)
        assert 1.0 <= r <= math.sqrt(1 + math.sinh(gamma) ** 2 / (n * n)) + 1e-6
        assert float(o.norm()) == pytest.approx(1 / r, rel=1e-5)
    w = nn.Parameter(torch.zeros(30, 10))
    w.grad = torch.randn(30, 10)
    AuON([{"params": [w], "role": "hidden"}], lr=0.1).step()
    _, r = auon_direction(w.grad.lerp(0.05 * w.grad, 0.95), 1.0)
    assert float(w.norm()) == pytest.approx(0.1 * math.sqrt(3) / r, rel=1e-4)  # lr sqrt(R/C) / r


def test_drop_muon_freezes_a_seeded_prefix_of_the_blocks():
    from dpfl.optim.drop_muon import DropMuon

    def run(seed):
        torch.manual_seed(0)
        model = SmallCNN()
        opt = DropMuon(role_param_groups(model), lr=0.02, seed=seed)
        blocks = opt.blocks()
        x, y = data()
        cutoffs = []
        for _ in range(4):
            before = [p.detach().clone() for p in blocks]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            k = opt.last_cutoff
            cutoffs.append(k)
            assert all(torch.equal(p, b) for p, b in zip(blocks[:k], before[:k], strict=True))
            assert all(not torch.equal(p, b) for p, b in zip(blocks[k:], before[k:], strict=True))
        return cutoffs

    assert run(3) == run(3) and len(set(run(3))) > 1


def test_config_lists_exactly_the_registered_optimizers():
    from dpfl.config import OPTIMIZER_NAMES

    assert sorted(OPTIMIZER_NAMES) == OPTIMIZERS.names()


def test_dpfl_optimizers_lists_measured_state_sizes():
    import json

    from typer.testing import CliRunner

    from dpfl.cli.main import app

    result = CliRunner().invoke(app, ["optimizers", "--json"])
    rows = json.loads(result.stdout)
    assert rows["scale"]["state_bytes_per_param"] == {
        "hidden": 0,
        "embedding": 0,
        "head": 4,
        "vector": 8,
    }
    assert rows["adamw"]["state_bytes_per_param"]["hidden"] == 8
    assert all(r["description"] for r in rows.values())


def test_optimizer_options_reach_the_constructor_and_bad_ones_are_clear_errors():
    model = SmallCNN()
    opt = create_optimizer(OptimizerConfig(name="frugal", options='{"density": 0.5}'), model)
    assert opt.density == 0.5
    with pytest.raises(ConfigError, match="do not fit frugal"):
        create_optimizer(OptimizerConfig(name="frugal", options='{"bogus": 1}'), model)
    with pytest.raises(ConfigError, match="must be a JSON object"):
        OptimizerConfig(options="[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        OptimizerConfig(options="{not json")
