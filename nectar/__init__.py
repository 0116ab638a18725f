"""NECTAR: energy- and thermal-aware Mixture-of-Experts inference with test-time-adapted routing.

The core package (pure torch + transformers). It never imports simpy, pynvml or cvxpy, nor the
backends (`sim`, `hw`) or `analysis`; those are reached through `nectar.plugins` by name.

`import nectar` registers NECTAR's model type with transformers' Auto classes without importing
torch or transformers itself (`nectar --help` imports neither): when transformers' config
registry (`transformers.models.auto.configuration_auto`) is imported, or at once if it already
is, a stand-in class for "nectar_moe_gpt2" is added to it. The first use of the stand-in (say
`AutoModelForCausalLM.from_pretrained(dir)` reading a NECTAR config.json) imports
`nectar.models.gpt2_moe`, whose import registers the real config and model classes. The hook
itself imports nothing, so it cannot run into a half-imported module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

__version__ = "0.1.0"

MODEL_TYPE = "nectar_moe_gpt2"
_REGISTRY_MODULE = "transformers.models.auto.configuration_auto"


def _real_config_class():
    return importlib.import_module("nectar.models.gpt2_moe").MoEGPT2Config


class _LazyConfigMeta(type):
    """Any attribute or call the stand-in does not have itself goes to the real config class."""

    def __getattr__(cls, name):
        return getattr(_real_config_class(), name)

    def __call__(cls, *args, **kwargs):
        return _real_config_class()(*args, **kwargs)


class LazyMoEGPT2Config(metaclass=_LazyConfigMeta):
    """Stands in transformers' CONFIG_MAPPING for "nectar_moe_gpt2" until nectar.models.gpt2_moe is
    imported."""

    model_type = MODEL_TYPE


def _add_stand_in(registry_module) -> None:
    mapping = getattr(registry_module, "CONFIG_MAPPING", None)
    if mapping is not None and MODEL_TYPE not in mapping:
        mapping.register(MODEL_TYPE, LazyMoEGPT2Config, exist_ok=True)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Post-import hook: when transformers' config registry finishes importing, add the stand-in."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _HookedLoader(spec.loader)
                return spec
        return None


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]
        _add_stand_in(module)

    def __getattr__(self, name):  # resource readers etc. of the real loader
        return getattr(self.loader, name)


def _install() -> None:
    if _REGISTRY_MODULE in sys.modules:
        _add_stand_in(sys.modules[_REGISTRY_MODULE])
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


_install()
