"""Looking a method up by name: the built-in methods (:data:`attnexplain.methods.METHODS`) and those
installed plugins add under their own names (:meth:`attnexplain.plugins.ModelPlugin.methods`).

A plugin's methods are registered only when they are of a family that has a pass
(:data:`attnexplain.passes.PASSES`) and take no name already taken, which is why this sits above
both the methods and the passes: the passes compute methods, and this checks methods against the
passes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from .errors import MethodError, error_line
from .methods import METHODS, Method
from .plugins import installed_plugins

if TYPE_CHECKING:
    from .plugins import ModelPlugin


def plugin_methods() -> dict[str, tuple["ModelPlugin", Method]]:
    """Every method an installed plugin adds under its own name, with that plugin (see
    :meth:`attnexplain.plugins.ModelPlugin.methods`). A plugin whose methods cannot be registered
    adds none: :func:`refused_plugin_methods` says why."""
    return _plugin_methods()[0]


def refused_plugin_methods() -> dict[str, str]:
    """Plugin name → why its methods are left out (:func:`method_clashes`, or methods() raised)."""
    return _plugin_methods()[1]


def _plugin_methods() -> tuple[dict[str, tuple["ModelPlugin", Method]], dict[str, str]]:
    # Checked here, when methods are first needed, not at plugin discovery: the check needs the
    # built-in methods, which import torch, and listings (`attnexplain plugins`, `models`) must not.
    found: dict[str, tuple[ModelPlugin, Method]] = {}
    refused: dict[str, str] = {}
    for plugin in installed_plugins():
        added, problem = _registered_methods(plugin, taken=found)
        if problem is not None:
            refused[plugin.name] = problem
        for method in added:
            found[method.name] = (plugin, method)
    return found, refused


def find_method(name: str, plugin: "ModelPlugin | None" = None) -> Method:
    """The method called ``name``: a built-in one, or one a plugin adds under its own name.

    With ``plugin`` (the model's), only that plugin's own methods count: a name another installed
    plugin adds is refused, naming the plugin that provides it. Without, any installed plugin's
    (for describing a map already made). Unknown names are refused with the known ones. Planning,
    the CLI, ``evaluate`` and the pages all look methods up here.
    """
    if name in METHODS:
        return METHODS[name]
    if plugin is None:
        provided = plugin_methods()
        own = {method_name: method for method_name, (_, method) in provided.items()}
    else:  # the model's plugin, installed or handed to the API in memory
        own = {method.name: method for method in _registered_methods(plugin)[0]}
    if name in own:
        return own[name]
    if plugin is not None:
        provided = plugin_methods()
        if name in provided:
            raise MethodError(
                f"{name} is provided by plugin {provided[name][0].name} for its models; "
                f"this model's plugin is {plugin.name}."
            )
    known = ", ".join([*METHODS, *own])
    raise MethodError(f"Unknown method {name!r}; `attnexplain methods` lists them (auto, {known}).")


def method_clashes(
    plugin: "ModelPlugin", taken: "Mapping[str, tuple[ModelPlugin, Method]] | None" = None
) -> str | None:
    """Why ``plugin``'s own methods cannot be registered (a name taken by a built-in method or by
    another plugin's, ``taken``; a method of no known family), or None."""
    return _registered_methods(plugin, taken)[1]


def own_methods(plugin: "ModelPlugin") -> tuple[list[Method], str | None]:
    """``plugin``'s own methods, and why they cannot be registered (then none are), other plugins'
    names left out of the check: what ``attnexplain methods`` keeps of a plugin in its cache."""
    return _registered_methods(plugin)


def _registered_methods(
    plugin: "ModelPlugin", taken: "Mapping[str, tuple[ModelPlugin, Method]] | None" = None
) -> tuple[list[Method], str | None]:
    """``plugin``'s own methods, asked once, and why they cannot be registered (then none are)."""
    try:
        methods = list(plugin.methods())
    except Exception as error:  # a broken plugin must not break the others
        return [], f"its methods() raised {error_line(error)}"[:300]
    if not methods:
        return [], None
    # The families are the passes registered, which import torch: `attnexplain methods` must not
    # pay for it where no plugin adds a method.
    from .passes import PASSES

    for method in methods:
        if not isinstance(method, Method):
            return [], f"its methods() returned {type(method).__name__}, not attnexplain.methods.Method"
        if method.name in METHODS or method.name == "auto":
            return [], f"its method {method.name!r} has the name of a built-in method"
        if taken and method.name in taken:
            return [], f"its method {method.name!r} is plugin {taken[method.name][0].name}'s already"
        if method.family not in PASSES:
            return [], (f"its method {method.name!r} is of family {method.family!r}, not one of {', '.join(PASSES)}")
    return methods, None


__all__ = ["find_method", "method_clashes", "own_methods", "plugin_methods", "refused_plugin_methods"]
