"""Hydra's search path: ``conf/`` holds the building blocks, ``experiments/`` the named studies.

Hydra looks up ``experiment=NAME`` as ``experiment/NAME.yaml`` under each search-path root. To keep
the studies in their own top-level folder, this module registers a small config source that
serves the files of ``experiments/`` as the ``experiment`` group, and a search-path plugin that
adds it. Both are registered with Hydra's public ``Plugins.register``.
"""

from __future__ import annotations

from pathlib import Path

from hydra._internal.core_plugins.file_config_source import FileConfigSource
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin

GROUP = "experiment"
EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


class ExperimentsSource(ConfigSource):
    """The files of one folder, seen by Hydra as the configs of the ``experiment`` group."""

    def __init__(self, provider: str, path: str) -> None:
        super().__init__(provider=provider, path=path)
        self.folder = FileConfigSource(provider, f"file://{self.path}")

    @staticmethod
    def scheme() -> str:
        return "normlab-experiments"

    @staticmethod
    def _inside(config_path: str) -> str | None:
        """The path inside the folder, or None for anything outside the ``experiment`` group."""
        config_path = config_path.strip("/")
        if config_path == GROUP:
            return ""
        if config_path.startswith(GROUP + "/"):
            return config_path[len(GROUP) + 1:]
        return None

    def available(self) -> bool:
        return self.folder.available()

    def is_group(self, config_path: str) -> bool:
        inside = self._inside(config_path)
        return config_path.strip("/") == "" or (inside is not None and self.folder.is_group(inside))

    def is_config(self, config_path: str) -> bool:
        inside = self._inside(config_path)
        return bool(inside) and self.folder.is_config(inside)

    def load_config(self, config_path: str) -> ConfigResult:
        return self.folder.load_config(self._inside(config_path) or "")

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        if config_path.strip("/") == "":
            return [GROUP] if results_filter in (None, ObjectType.GROUP) else []
        inside = self._inside(config_path)
        return [] if inside is None else self.folder.list(inside, results_filter)


class ExperimentsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="normlab-experiments", path=f"{ExperimentsSource.scheme()}://{EXPERIMENTS_DIR}")


def register() -> None:
    for plugin in (ExperimentsSource, ExperimentsSearchPath):
        Plugins.instance().register(plugin)
