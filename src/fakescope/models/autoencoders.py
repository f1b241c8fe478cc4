"""The autoencoder registry: latent-diffusion autoencoders that turn a real image into its reconstruction.

``create_autoencoder("taef2", weights="../shared/weights")`` or ``create_autoencoder("sd-vae")``;
``list_autoencoders()`` describes them all. Every entry records its down-sampling factor, latent channels
and input range; :meth:`Autoencoder.reconstruct` takes and returns images in [0, 1] of any size (it pads
to a multiple of the factor by reflection and crops the result back), so callers never see the range or
the factor.

* The TAESD family (``taesd``, ``taesdxl``, ``taesd3``, ``taef1``, ``taef2``; madebyollin/taesd, MIT
  licence): the architecture is written here (3x3 Conv + ReLU residual blocks, three stride-2
  convolutions down, nearest x2 up-sampling up; taef2 adds a group-norm "pool" branch to the blocks
  around the latent and has 32 latent channels). Weights: a file or folder holding
  ``<name>_encoder.{safetensors,pth}`` and ``<name>_decoder.{...}`` (the published ``taesd.py`` state
  dicts), or a diffusers ``AutoencoderTiny`` folder / hub repository ``madebyollin/<name>``.
* ``sd-vae``, ``sdxl-vae``, ``sd3-vae``, ``flux-vae``: diffusers' ``AutoencoderKL`` from the hub or a local
  diffusers folder (needs the ``align`` extra: ``pip install fakescope[align]``).

Weights that are needed and cannot be had give one :class:`~fakescope.errors.FakescopeError` line that
says how to provide them; nothing ever falls back to random weights.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fakescope.errors import FakescopeError
from fakescope.models.timm_models import _hub_reachable

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class AutoencoderSpec:
    """What an autoencoder is: ``factor`` (down-sampling), ``latent_channels``, ``input_range`` (the range
    its encoder takes and its decoder returns), and for KL VAEs the latent ``scaling_factor`` /
    ``shift_factor`` a diffusion model applies (recorded; a reconstruction does not need them)."""

    name: str
    kind: str  # "taesd" | "kl"
    description: str
    factor: int
    latent_channels: int
    input_range: tuple[float, float]
    hub_repo: str
    hub_subfolder: str | None = None
    pool_blocks: bool = False
    scaling_factor: float | None = None
    shift_factor: float | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "factor": self.factor, "latent_channels": self.latent_channels,
                "input_range": list(self.input_range), "hub_repo": self.hub_repo, "hub_subfolder": self.hub_subfolder,
                "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}


_SPECS: dict[str, AutoencoderSpec] = {}


def _register(spec: AutoencoderSpec) -> None:
    _SPECS[spec.name] = spec


for _name, _ch, _desc in (
    ("taesd", 4, "tiny autoencoder for Stable Diffusion 1.x/2.x latents"),
    ("taesdxl", 4, "tiny autoencoder for SDXL latents"),
    ("taesd3", 16, "tiny autoencoder for Stable Diffusion 3 latents"),
    ("taef1", 16, "tiny autoencoder for FLUX.1 latents"),
):
    _register(AutoencoderSpec(_name, "taesd", f"TAESD family: {_desc}", 8, _ch, (0.0, 1.0), f"madebyollin/{_name}"))
_register(AutoencoderSpec("taef2", "taesd", "TAESD family: tiny autoencoder for FLUX.2 latents (group-norm pool "
                                            "blocks)", 8, 32, (0.0, 1.0), "madebyollin/taef2", pool_blocks=True))
_register(AutoencoderSpec("sd-vae", "kl", "Stable Diffusion 1.x/2.x VAE (diffusers AutoencoderKL)", 8, 4,
                          (-1.0, 1.0), "stabilityai/sd-vae-ft-mse", scaling_factor=0.18215))
_register(AutoencoderSpec("sdxl-vae", "kl", "SDXL VAE (diffusers AutoencoderKL)", 8, 4, (-1.0, 1.0),
                          "stabilityai/sdxl-vae", scaling_factor=0.13025))
_register(AutoencoderSpec("sd3-vae", "kl", "Stable Diffusion 3 VAE (diffusers AutoencoderKL)", 8, 16, (-1.0, 1.0),
                          "stabilityai/stable-diffusion-3-medium-diffusers", hub_subfolder="vae",
                          scaling_factor=1.5305, shift_factor=0.0609))
_register(AutoencoderSpec("flux-vae", "kl", "FLUX.1 VAE (diffusers AutoencoderKL)", 8, 16, (-1.0, 1.0),
                          "black-forest-labs/FLUX.1-schnell", hub_subfolder="vae",
                          scaling_factor=0.3611, shift_factor=0.1159))


def list_autoencoders() -> dict[str, AutoencoderSpec]:
    """The registered autoencoders by name (the one list ``--autoencoder`` choices come from)."""
    return dict(_SPECS)


def autoencoder_spec(name: str) -> AutoencoderSpec:
    if name not in _SPECS:
        raise FakescopeError(f"unknown autoencoder {name!r}: expected one of {', '.join(_SPECS)}")
    return _SPECS[name]


# --- the TAESD architecture -------------------------------------------------------------------

def _conv(n_in: int, n_out: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class Clamp(nn.Module):
    """Soft clamp of the latents to about [-3, 3]: ``tanh(x / 3) * 3``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """``relu(conv(x) + x)`` with ``conv`` = conv-ReLU-conv-ReLU-conv; with ``pool``, ``x + pool(x)`` first,
    ``pool`` = 1x1 conv c->4c, GroupNorm(4, 4c), ReLU, 1x1 conv 4c->c (taef2)."""

    def __init__(self, c: int, pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(c, c), nn.ReLU(), _conv(c, c), nn.ReLU(), _conv(c, c))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()
        if pool:
            self.pool = nn.Sequential(nn.Conv2d(c, 4 * c, 1, bias=False), nn.GroupNorm(4, 4 * c), nn.ReLU(),
                                      nn.Conv2d(4 * c, c, 1, bias=False))
        else:
            self.pool = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def taesd_encoder(latent_channels: int, pool: bool = False, width: int = 64) -> nn.Sequential:
    c = width
    return nn.Sequential(
        _conv(3, c), Block(c),
        _conv(c, c, stride=2, bias=False), Block(c), Block(c), Block(c),
        _conv(c, c, stride=2, bias=False), Block(c), Block(c), Block(c),
        _conv(c, c, stride=2, bias=False), Block(c, pool), Block(c, pool), Block(c, pool),
        _conv(c, latent_channels),
    )


def taesd_decoder(latent_channels: int, pool: bool = False, width: int = 64) -> nn.Sequential:
    c = width
    return nn.Sequential(
        Clamp(), _conv(latent_channels, c), nn.ReLU(),
        Block(c, pool), Block(c, pool), Block(c, pool), nn.Upsample(scale_factor=2), _conv(c, c, bias=False),
        Block(c), Block(c), Block(c), nn.Upsample(scale_factor=2), _conv(c, c, bias=False),
        Block(c), Block(c), Block(c), nn.Upsample(scale_factor=2), _conv(c, c, bias=False),
        Block(c), _conv(c, 3),
    )


# --- the wrapper every caller uses -----------------------------------------------------------

class Autoencoder(nn.Module):
    """An encoder/decoder pair with its :class:`AutoencoderSpec`. ``encode``/``decode`` work in the
    autoencoder's own range and on sizes that are multiples of ``spec.factor``; :meth:`reconstruct` takes
    and returns ``[N, 3, H, W]`` images in [0, 1] of any size."""

    def __init__(self, spec: AutoencoderSpec, weights_sha256: str, weights_source: str) -> None:
        super().__init__()
        self.spec = spec
        self.weights_sha256 = weights_sha256
        self.weights_source = weights_source

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _to_range(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.spec.input_range
        return x if (lo, hi) == (0.0, 1.0) else x * (hi - lo) + lo

    def _from_range(self, y: torch.Tensor) -> torch.Tensor:
        lo, hi = self.spec.input_range
        return y if (lo, hi) == (0.0, 1.0) else (y - lo) / (hi - lo)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Reflect-pad the right and bottom edges to a multiple of the factor (replicate when too small)."""
        f = self.spec.factor
        h, w = x.shape[-2:]
        ph, pw = (-h) % f, (-w) % f
        if not ph and not pw:
            return x
        mode = "reflect" if ph < h and pw < w else "replicate"
        return F.pad(x, (0, pw, 0, ph), mode=mode)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))`` for images in [0, 1] (``[N, 3, H, W]``), clamped to [0, 1], same size."""
        h, w = x.shape[-2:]
        y = self.decode(self.encode(self._to_range(self.pad(x))))
        return self._from_range(y.float()).clamp(0, 1)[..., :h, :w]


class TinyAutoencoder(Autoencoder):
    def __init__(self, spec: AutoencoderSpec, encoder_sd: dict | None, decoder_sd: dict | None,
                 weights_sha256: str = "", weights_source: str = "", width: int = 64) -> None:
        super().__init__(spec, weights_sha256, weights_source)
        self.encoder = taesd_encoder(spec.latent_channels, spec.pool_blocks, width)
        self.decoder = taesd_decoder(spec.latent_channels, spec.pool_blocks, width)
        for part, sd in (("encoder", encoder_sd), ("decoder", decoder_sd)):
            if sd is None:
                continue
            try:
                getattr(self, part).load_state_dict(sd, strict=True)
            except RuntimeError as e:
                first = str(e).splitlines()[0][:160]
                raise FakescopeError(f"the {part} weights from {weights_source} do not fit {spec.name} ({first}): "
                                     f"expected the state dict of {spec.name}_{part} from madebyollin/taesd") from None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


class KLAutoencoder(Autoencoder):
    """diffusers ``AutoencoderKL``; the latent is the posterior's mode (deterministic)."""

    def __init__(self, spec: AutoencoderSpec, vae, weights_sha256: str, weights_source: str) -> None:
        super().__init__(spec, weights_sha256, weights_source)
        self.vae = vae
        cfg = vae.config
        self.spec = AutoencoderSpec(
            spec.name, spec.kind, spec.description, 2 ** (len(cfg.block_out_channels) - 1), int(cfg.latent_channels),
            spec.input_range, spec.hub_repo, spec.hub_subfolder,
            scaling_factor=getattr(cfg, "scaling_factor", spec.scaling_factor),
            shift_factor=getattr(cfg, "shift_factor", spec.shift_factor))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x).latent_dist.mode()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


# --- weights -----------------------------------------------------------------------------------

def sha256_files(paths: list[str]) -> str:
    """SHA-256 over the bytes of ``paths``, in that order."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _load_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad weights file
        raise FakescopeError(f"cannot read weights {path} ({type(e).__name__}): expected a safetensors file or a "
                             f"state-dict .pth") from None
    if not isinstance(sd, dict):
        raise FakescopeError(f"expected a state dict in {path}, got {type(sd).__name__}")
    return sd


def _find(folder: Path, stem: str) -> str | None:
    for suf in WEIGHT_SUFFIXES:
        p = folder / f"{stem}{suf}"
        if p.is_file():
            return str(p)
    return None


def _split_diffusers_tiny(sd: dict) -> tuple[dict, dict]:
    """A diffusers ``AutoencoderTiny`` state dict (``encoder.layers.N.*``, ``decoder.layers.N.*``, the
    decoder's clamp outside its layers) as taesd.py's two state dicts."""
    enc, dec = {}, {}
    for k, v in sd.items():
        if k.startswith("encoder.layers."):
            enc[k[len("encoder.layers."):]] = v
        elif k.startswith("decoder.layers."):
            i, rest = k[len("decoder.layers."):].split(".", 1)
            dec[f"{int(i) + 1}.{rest}"] = v
    return enc, dec


def _tiny_weights(spec: AutoencoderSpec, weights: str | None) -> tuple[dict, dict, list[str], str]:
    name = spec.name
    if weights is not None:
        p = Path(weights)
        if not p.exists():
            raise FakescopeError(f"--weights {weights} not found: expected a file or a folder holding "
                                 f"{name}_encoder.safetensors and {name}_decoder.safetensors")
        if p.is_dir():
            enc, dec = _find(p, f"{name}_encoder"), _find(p, f"{name}_decoder")
            if enc and dec:
                return _load_state_dict(enc), _load_state_dict(dec), [enc, dec], str(p)
            single = _find(p, "diffusion_pytorch_model")
            if single:
                e, d = _split_diffusers_tiny(_load_state_dict(single))
                return e, d, [single], str(p)
            raise FakescopeError(f"no {name} weights in {weights}: expected {name}_encoder.* and {name}_decoder.* "
                                 f"(.safetensors or .pth) or a diffusers diffusion_pytorch_model.safetensors")
        stem = p.name.split(".")[0]
        if stem.endswith("_encoder") or stem.endswith("_decoder"):
            other_stem = stem[:-len("_encoder")] + ("_decoder" if stem.endswith("_encoder") else "_encoder")
            other = _find(p.parent, other_stem)
            if other is None:
                raise FakescopeError(f"--weights {weights}: expected {other_stem}.* next to it")
            enc, dec = (str(p), other) if stem.endswith("_encoder") else (other, str(p))
            return _load_state_dict(enc), _load_state_dict(dec), [enc, dec], str(p.parent)
        e, d = _split_diffusers_tiny(_load_state_dict(str(p)))
        if not e or not d:
            raise FakescopeError(f"--weights {weights}: expected {name}_encoder.* / {name}_decoder.* or a diffusers "
                                 f"AutoencoderTiny state dict (encoder.layers.*, decoder.layers.*)")
        return e, d, [str(p)], str(p)
    path = _hub_file(spec, "diffusion_pytorch_model.safetensors")
    e, d = _split_diffusers_tiny(_load_state_dict(path))
    return e, d, [path], f"hf://{spec.hub_repo}"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _hub_help(spec: AutoencoderSpec) -> str:
    sub = f" (subfolder {spec.hub_subfolder})" if spec.hub_subfolder else ""
    what = (f"a folder with {spec.name}_encoder.safetensors and {spec.name}_decoder.safetensors" if spec.kind == "taesd"
            else "a local diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)")
    return (f"pass --weights PATH ({what}, e.g. downloaded with `huggingface-cli download {spec.hub_repo}`{sub} on a "
            f"machine with internet)")


def _hub_file(spec: AutoencoderSpec, filename: str) -> str:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    in_repo = f"{spec.hub_subfolder}/{filename}" if spec.hub_subfolder else filename
    cached = try_to_load_from_cache(spec.hub_repo, in_repo)
    if isinstance(cached, str):
        return cached
    if _hub_offline():
        raise FakescopeError(f"{spec.name} weights are not in the local cache and the hub is off (HF_HUB_OFFLINE): "
                             f"{_hub_help(spec)}")

    if not _hub_reachable():
        raise FakescopeError(f"{spec.name} weights are not in the local cache and the Hugging Face hub cannot be "
                             f"reached: {_hub_help(spec)}")
    try:
        return hf_hub_download(spec.hub_repo, filename, subfolder=spec.hub_subfolder)
    except Exception as e:  # noqa: BLE001 - gated, missing, network: one line
        raise FakescopeError(f"could not download {spec.name} weights from {spec.hub_repo} "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}): "
                             f"{_hub_help(spec)}") from None


def _kl_folder(spec: AutoencoderSpec, weights: str | None) -> tuple[str, list[str]]:
    if weights is None:
        cfg = _hub_file(spec, "config.json")
        folder = os.path.dirname(cfg)
        _hub_file(spec, "diffusion_pytorch_model.safetensors")
    else:
        folder = weights
        if not os.path.isdir(folder):
            raise FakescopeError(f"--weights {weights}: expected a diffusers AutoencoderKL folder "
                                 f"(config.json + diffusion_pytorch_model.safetensors)")
        if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(
                os.path.join(folder, "vae", "config.json")):
            folder = os.path.join(folder, "vae")
    files = sorted(str(p) for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not os.path.isfile(os.path.join(folder, "config.json")) or not files:
        raise FakescopeError(f"no {spec.name} weights in {folder}: expected config.json and "
                             f"diffusion_pytorch_model.safetensors (a diffusers AutoencoderKL folder)")
    return folder, files


def _kl(spec: AutoencoderSpec, weights: str | None) -> KLAutoencoder:
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise FakescopeError(f"{spec.name} needs diffusers: pip install 'fakescope[align]'") from None
    folder, files = _kl_folder(spec, weights)
    try:
        vae = AutoencoderKL.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as e:
        raise FakescopeError(f"cannot load {spec.name} from {folder} ({str(e).splitlines()[0][:160]}): "
                             f"{_hub_help(spec)}") from None
    return KLAutoencoder(spec, vae.eval(), sha256_files(files), weights or f"hf://{spec.hub_repo}")


def _tiny(spec: AutoencoderSpec, weights: str | None) -> TinyAutoencoder:
    enc, dec, files, source = _tiny_weights(spec, weights)
    return TinyAutoencoder(spec, enc, dec, sha256_files(files), source)


_BUILDERS: dict[str, Callable[[AutoencoderSpec, str | None], Autoencoder]] = {"taesd": _tiny, "kl": _kl}


def create_autoencoder(name: str, weights: str | os.PathLike | None = None) -> Autoencoder:
    """The autoencoder ``name`` with its weights (``weights``: a file or folder; None: the hub), in eval mode
    with gradients off."""
    spec = autoencoder_spec(name)
    ae = _BUILDERS[spec.kind](spec, None if weights is None else str(weights))
    ae.eval().requires_grad_(False)
    return ae
