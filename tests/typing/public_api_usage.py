"""Not a test module: code written as a user and a plugin author write it, type-checked by mypy
(`make lint`), so that the public API's types (attnexplain's lazy exports and the plugin API)
resolve to the real classes and functions, not to ``Any``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

import attnexplain
from attnexplain.plugin_api import CatalogEntry, ModelPlugin, Preprocessing, not_a_regular_file, use_plugins


def explain_a_photo(model: Path, photo: Path) -> list[str]:
    options = attnexplain.MethodOptions()
    result: attnexplain.Explanation = attnexplain.explain(str(model), str(photo), options=options)
    loaded: attnexplain.LoadedModel = attnexplain.load_model(str(model))
    image: attnexplain.LoadedImage = attnexplain.load_image(photo)
    assert image is not None and loaded is not None
    return [method.family for method in attnexplain.METHODS.values()] + list(result.maps)


class MyPlugin(ModelPlugin):
    name = "mine"

    def catalog(self) -> list[CatalogEntry]:
        return []

    def preprocessing(self, model: nn.Module) -> Preprocessing | None:
        return None


def install_for_a_test(path: Path) -> str | None:
    with use_plugins(MyPlugin()):
        return not_a_regular_file(path)
