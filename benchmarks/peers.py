"""Optional imports of the things the benchmark compares: lrpfunc, Zennit 0.5.1, Captum.

Every import is optional: :func:`load` returns a :class:`Peers` whose missing members are ``None``
with the reason in ``why``, so that the benchmark can measure the rest and say what it skipped.

Zennit 0.5.1 imports ``torchvision.models.resnet`` at top level (for its ``ResNetCanonizer``). When no
real torchvision imports, ``benchmarks/_standin`` goes on ``sys.path``: its ``torchvision.models.resnet``
re-exports ``benchmarks.models.BasicBlock``/``Bottleneck``, so Zennit's ``isinstance`` checks see the
benchmark's blocks. When a real torchvision *is* present, Zennit checks against torchvision's classes,
which the benchmark's blocks are not; :func:`load` then points ``zennit.torchvision``'s two block names
at the benchmark's classes (module globals read at call time) and says so in ``notes``.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path
from types import ModuleType

from benchmarks import models as bm_models

STANDIN = Path(__file__).resolve().parent / "_standin"


@dataclasses.dataclass
class Peers:
    lrpfunc: ModuleType | None = None
    zennit: ModuleType | None = None
    captum_attr: ModuleType | None = None
    why: dict[str, str] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:200]


def _version(name: str) -> str:
    """The imported module's ``__version__`` (lrpfunc comes from the checkout, whatever the environment has
    installed), else the installed distribution's version."""
    module = sys.modules.get(name)
    if getattr(module, "__version__", None) is not None:
        return str(module.__version__)
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # not installed as a distribution
        return "unknown"


def ensure_torchvision() -> str:
    """Import torchvision, falling back to the stand-in; return a line that says which one."""
    try:
        import torchvision  # noqa: F401

        return f"real torchvision {getattr(torchvision, '__version__', '?')}"
    except Exception as exc:  # ImportError, or a build that does not match torch (RuntimeError)
        reason = _reason(exc)
    for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[key]
    sys.path.insert(0, str(STANDIN))
    importlib.invalidate_caches()
    import torchvision.models.resnet as tv_resnet

    assert tv_resnet.BasicBlock is bm_models.BasicBlock and tv_resnet.Bottleneck is bm_models.Bottleneck
    return f"torchvision stand-in from {STANDIN} (real import failed: {reason})"


def load(*, want_lrpfunc: bool = True, want_zennit: bool = True, want_captum: bool = True) -> Peers:
    peers = Peers()
    if want_lrpfunc:
        try:
            import lrpfunc

            for attr in ("attribute", "composites", "rules", "canonizers"):
                getattr(lrpfunc, attr)
            peers.lrpfunc = lrpfunc
            peers.versions["lrpfunc"] = _version("lrpfunc")
        except Exception as exc:  # ImportError/AttributeError while the library is being written
            peers.why["lrpfunc"] = _reason(exc)
    else:
        peers.why["lrpfunc"] = "disabled (--no-lrpfunc)"

    if want_zennit:
        try:
            peers.notes.append(ensure_torchvision())
            import zennit
            import zennit.torchvision as ztv

            if ztv.ResNetBasicBlock is not bm_models.BasicBlock:
                ztv.ResNetBasicBlock = bm_models.BasicBlock
                ztv.ResNetBottleneck = bm_models.Bottleneck
                peers.notes.append(
                    "real torchvision present: zennit.torchvision's ResNet block names were pointed at "
                    "benchmarks.models' blocks so that ResNetCanonizer recognises them"
                )
            peers.zennit = zennit
            peers.versions["zennit"] = _version("zennit")
        except Exception as exc:
            peers.why["zennit"] = _reason(exc)
    else:
        peers.why["zennit"] = "disabled"

    if want_captum:
        try:
            import captum.attr

            captum.attr.LRP  # noqa: B018
            peers.captum_attr = captum.attr
            peers.versions["captum"] = _version("captum")
        except Exception as exc:
            peers.why["captum"] = _reason(exc)
    else:
        peers.why["captum"] = "disabled"
    return peers
