"""C2C's fuser as thu-nics/C2C computes it (its `C2CProjector`), one per receiver layer, and the released
checkpoint format it is saved in.

Both models read the same input. Per receiver layer, each of B's prompt tokens has B's own key (and
value) and the key of the sender layer paired with it (A's tokens of the same characters, pooled):

    x   = concat(K_A, K_B)                      heads flattened, A's first
    h   = FFN(W_in x)                           widened to `hidden_dim`, one pre-RMSNorm residual block
    P   = W_out FFN^(num_layers - 2)(h)         the projected key, in B's head layout
    w   = sigmoid(W_w FFN(h))                   a weight per token and B head, on its own branch
    K'  = K_B + g_K * w * P                     g_K: the key gate

and the same for values with their own weights and gate. The gate is one logit per layer and kind; in
training a Gumbel sample per row, head and token is added to it and sigmoid((logit + G) / T) taken,
T annealed geometrically from `initial_temperature` to `final_temperature` over `anneal_steps`; at
evaluation the gate is hard (logit > 0). A closed gate leaves B's own cache exactly as it was. The
attribute names are C2C's, so a released `projector_{i}.pt` loads into this module as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cross_model.c2c.projector import model_record, pair_layers

RELEASED_CLASS = "C2CProjector"  # the class name C2C's projector_{i}.json records
MAPPING_FILE = "projector_config.json"  # C2C's {target model: {source model: {target layer: [[source layer, projector]]}}}
FUSER_DEFAULTS = {
    "intermediate_dim": 1024,
    "hidden_dim": 1024,
    "num_layers": 3,
    "dropout": 0.1,
    "initial_temperature": 1.0,
    "final_temperature": 0.001,
    "anneal_steps": 1929,
}


class FFNBlock(nn.Module):
    """x + dropout(w2(gelu(w1(rmsnorm(x))))), bias-free (C2C's StandardFFNLayer)."""

    def __init__(self, width: int, inner: int, dropout: float):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.w1 = nn.Linear(width, inner, bias=False)
        self.w2 = nn.Linear(inner, width, bias=False)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.w2(self.act(self.w1(self.norm(x)))))


class FFNStack(nn.Module):
    def __init__(self, width: int, inner: int, depth: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList([FFNBlock(width, inner, dropout) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@dataclass
class GateNoise:
    """Per kind, one uniform draw per row, receiver head and token (B x H x N x 1), and the temperature."""

    u_key: torch.Tensor
    u_value: torch.Tensor
    temperature: float


def gumbel(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u + 1e-20) + 1e-20)


class LayerFuser(nn.Module):
    """One receiver layer's fuser (C2C's `C2CProjector`, its argument names kept)."""

    def __init__(
        self,
        source_dim: int,
        target_dim: int,
        source_num_heads: int,
        target_num_heads: int,
        intermediate_dim: int = 1024,
        hidden_dim: int = 1024,
        num_layers: int = 3,
        dropout: float = 0.1,
        initial_temperature: float = 1.0,
        final_temperature: float = 0.001,
        anneal_steps: int = 1929,
    ):
        super().__init__()
        if num_layers < 3:
            raise ValueError(f"c2c fuser: num_layers must be >= 3 (C2C's), got {num_layers}")
        self.init_args = {
            "source_dim": source_dim,
            "target_dim": target_dim,
            "source_num_heads": source_num_heads,
            "target_num_heads": target_num_heads,
            "intermediate_dim": intermediate_dim,
            "hidden_dim": hidden_dim,
            "num_layers": num_layers,
            "dropout": dropout,
            "initial_temperature": initial_temperature,
            "final_temperature": final_temperature,
            "anneal_steps": anneal_steps,
        }
        self.heads, self.head_dim = target_num_heads, target_dim
        d_in, d_out = source_dim * source_num_heads, target_dim * target_num_heads
        for kind in ("key", "value"):
            setattr(self, f"{kind}_in", nn.Linear(d_in + d_out, hidden_dim))
            setattr(self, f"{kind}_mlp1", FFNStack(hidden_dim, intermediate_dim, 1, dropout))
            setattr(self, f"{kind}_scalar_mlp2", FFNStack(hidden_dim, hidden_dim, 1, dropout))
            setattr(self, f"{kind}_scalar_head", nn.Linear(hidden_dim, target_num_heads))
            setattr(
                self,
                f"{kind}_proj_mlp2",
                FFNStack(hidden_dim, intermediate_dim, num_layers - 2, dropout),
            )
            setattr(self, f"{kind}_proj_out", nn.Linear(hidden_dim, d_out))
        self.key_gate_logit = nn.Parameter(torch.tensor(0.0))
        self.value_gate_logit = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("gate_temperature", torch.tensor(float(initial_temperature)))
        self.initial_temperature, self.final_temperature = initial_temperature, final_temperature
        self.anneal_steps = anneal_steps

    def temperature_at(self, step: int) -> float:
        ratio = min(step / self.anneal_steps, 1.0)
        return (
            self.initial_temperature * (self.final_temperature / self.initial_temperature) ** ratio
        )

    def open_kinds(self) -> dict[str, bool]:
        return {
            "key": float(self.key_gate_logit.detach()) > 0,
            "value": float(self.value_gate_logit.detach()) > 0,
        }

    def fuse(
        self,
        kind: str,
        source_BND: torch.Tensor,
        target_BHND: torch.Tensor,
        u_BHN1: torch.Tensor | None = None,
        temperature: float | None = None,
        force_open: bool = False,
    ) -> torch.Tensor:
        """B's keys (or values) of this layer after fusion: target + gate * weight * projection. The gate
        is soft with the uniforms `u_BHN1` (training), held open with `force_open`, else hard."""
        b, h, n, d = target_BHND.shape
        x = torch.cat([source_BND, target_BHND.transpose(1, 2).reshape(b, n, h * d)], dim=-1)
        hidden = getattr(self, f"{kind}_mlp1")(getattr(self, f"{kind}_in")(x))
        projected = getattr(self, f"{kind}_proj_out")(getattr(self, f"{kind}_proj_mlp2")(hidden))
        projected = projected.view(b, n, h, d).transpose(1, 2)
        weight = torch.sigmoid(
            getattr(self, f"{kind}_scalar_head")(getattr(self, f"{kind}_scalar_mlp2")(hidden))
        )
        weight = weight.permute(0, 2, 1).unsqueeze(-1)  # B x H x N x 1
        logit = getattr(self, f"{kind}_gate_logit")
        if force_open:
            return target_BHND + weight * projected
        if u_BHN1 is None:
            gate = (logit > 0).to(projected.dtype)
        else:
            gate = torch.sigmoid((logit + gumbel(u_BHN1.to(projected.dtype))) / temperature)
        return target_BHND + gate * weight * projected


class CacheFuser(nn.Module):
    """Every receiver layer's fuser and the sender layer it reads."""

    def __init__(
        self,
        sender: dict,
        receiver: dict,
        pairing: str,
        fuser_args: dict[str, Any],
        partners: list[int] | None = None,
    ):
        super().__init__()
        self.sender, self.receiver, self.pairing = sender, receiver, pairing
        self.partners = (
            partners
            if partners is not None
            else pair_layers(sender["num_layers"], receiver["num_layers"], pairing)
        )
        self.fusers = nn.ModuleList(
            [
                LayerFuser(
                    sender["head_dim"],
                    receiver["head_dim"],
                    sender["num_kv_heads"],
                    receiver["num_kv_heads"],
                    **fuser_args,
                )
                for _ in self.partners
            ]
        )

    def open_layers(self) -> list[int]:
        """Receiver layers with an open key or value gate (what evaluation fuses and A sends for)."""
        return [l for l, f in enumerate(self.fusers) if any(f.open_kinds().values())]

    def gate_logits(self) -> torch.Tensor:
        return torch.stack(
            [torch.stack([f.key_gate_logit, f.value_gate_logit]) for f in self.fusers]
        )


# --- C2C's released checkpoint format ------------------------------------------------------------------------


def write_released(fuser: CacheFuser, directory: str | Path) -> Path:
    """`fuser` in C2C's checkpoint format: per receiver layer `projector_{l}.json` (class and init
    arguments) and `projector_{l}.pt` (its state dict), and `projector_config.json` mapping receiver
    layer l (model 0) to [[sender layer, projector l]] of source model 1."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    mapping: dict[str, dict[str, dict[str, list]]] = {"0": {"1": {}}}
    for l, (f, la) in enumerate(zip(fuser.fusers, fuser.partners)):
        args = {**f.init_args, "dtype": "torch.float32"}
        (out / f"projector_{l}.json").write_text(
            json.dumps({"model_name": RELEASED_CLASS, "init_args": args}, indent=2)
        )
        torch.save(
            {k: v.detach().cpu() for k, v in f.state_dict().items()}, out / f"projector_{l}.pt"
        )
        mapping["0"]["1"][str(l)] = [[la, l]]
    (out / MAPPING_FILE).write_text(json.dumps(mapping))
    return out


def _class_and_args(path: Path) -> tuple[str, dict[str, Any]]:
    spec = json.loads(path.read_text())
    name = next((spec[k] for k in ("model_name", "class_name", "class", "type") if k in spec), None)
    if name is None or "init_args" not in spec:
        raise ValueError(
            f"c2c: {path} names no projector class and init_args (C2C's projector_{{i}}.json has both)"
        )
    return name, dict(spec["init_args"])


def is_released(directory: str | Path) -> bool:
    return (Path(directory) / MAPPING_FILE).exists()


def read_released(directory: str | Path, sender: dict, receiver: dict) -> CacheFuser:
    """A released C2C fuser directory as a CacheFuser for this pair, refusing what does not fit: another
    projector class, a receiver layer without a projector or with several sources (C2C's aggregators),
    widths or heads of another pair, missing or unexpected weights."""
    directory = Path(directory)
    mapping = json.loads((directory / MAPPING_FILE).read_text())
    try:
        layers = mapping["0"]["1"]
    except (KeyError, TypeError):
        raise ValueError(
            f"c2c: {directory / MAPPING_FILE} has no target model 0 / source model 1 entry"
        ) from None
    n_b = receiver["num_layers"]
    if sorted(int(l) for l in layers) != list(range(n_b)):
        raise ValueError(
            f"c2c: {directory} maps receiver layers {sorted(int(l) for l in layers)}, the receiver "
            f"{receiver['name']} has {n_b}; every layer needs its projector"
        )
    partners, which, args = [], [], None
    for l in range(n_b):
        entry = layers[str(l)]
        if len(entry) != 1:
            raise ValueError(
                f"c2c: receiver layer {l} in {directory} reads {len(entry)} sender layers; "
                f"several sources (C2C's aggregators) are not supported"
            )
        la, idx = (int(x) for x in entry[0])
        if not 0 <= la < sender["num_layers"]:
            raise ValueError(
                f"c2c: receiver layer {l} reads sender layer {la}; {sender['name']} has {sender['num_layers']}"
            )
        name, got = _class_and_args(directory / f"projector_{idx}.json")
        if name != RELEASED_CLASS:
            raise ValueError(
                f"c2c: projector_{idx} is a {name}; only C2C's {RELEASED_CLASS} is implemented"
            )
        got.pop("dtype", None)
        want = {
            "source_dim": sender["head_dim"],
            "target_dim": receiver["head_dim"],
            "source_num_heads": sender["num_kv_heads"],
            "target_num_heads": receiver["num_kv_heads"],
        }
        bad = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
        if bad:
            raise ValueError(
                f"c2c: projector_{idx} was made for another pair ({', '.join(f'{k} {a} there, {b} here' for k, (a, b) in bad.items())})"
            )
        if args is not None and {k: v for k, v in got.items() if k not in want} != args:
            raise ValueError(
                f"c2c: projector_{idx}'s sizes differ from projector_{which[0]}'s; one fuser size per directory"
            )
        args = {k: v for k, v in got.items() if k not in want}
        partners.append(la)
        which.append(idx)
    fuser = CacheFuser(
        sender, receiver, "released", {**FUSER_DEFAULTS, **(args or {})}, partners=partners
    )
    for f, idx in zip(fuser.fusers, which):
        state = torch.load(directory / f"projector_{idx}.pt", map_location="cpu", weights_only=True)
        try:
            missing, unexpected = f.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a tensor of another shape
            raise ValueError(
                f"c2c: projector_{idx}.pt does not fit C2C's {RELEASED_CLASS}: {e}"
            ) from None
        if missing or unexpected:
            raise ValueError(
                f"c2c: projector_{idx}.pt does not fit C2C's {RELEASED_CLASS}: missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}"
            )
    return fuser


def new_fuser(params: Any, a: Any, b: Any) -> CacheFuser:
    """A fresh fuser for the pair (a c2c method's parameters), initialised from `params.seed`."""
    torch.manual_seed(params.seed)
    args = {
        "intermediate_dim": params.intermediate_dim,
        "hidden_dim": params.hidden_dim,
        "num_layers": params.num_layers,
        "dropout": params.dropout,
        "initial_temperature": params.tau_start,
        "final_temperature": params.tau_end,
        "anneal_steps": params.anneal_steps or params.steps,
    }
    return CacheFuser(model_record(a), model_record(b), params.pairing, args)
