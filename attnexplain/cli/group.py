"""The ``attnexplain`` group: its ``--debug`` option, and how a command's errors, warnings and log
records reach the terminal. The commands are added in :mod:`attnexplain.cli`."""

from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import click

from .._untrusted import terminal_text


class _Group(click.Group):
    """Turns expected errors into one-line messages and unexpected ones into one line plus a hint;
    keeps libraries' warnings and log records off the terminal unless ``--debug``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # --debug belongs to the group, but people add it at the end of a failing command line.
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[:end]:
            args = ["--debug"] + [arg for i, arg in enumerate(args) if i >= end or arg != "--debug"]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        from ..errors import AttnExplainError

        try:
            with _library_noise(shown=bool(ctx.params.get("debug"))):
                return super().invoke(ctx)
        except SystemExit as exiting:
            # Our commands end through click (ctx.exit, exceptions) or sys.exit with a failure
            # code; a success code here comes from code we ran (a model, a plugin) ending the
            # program early, which must not look like a finished command.
            if exiting.code not in (0, None):
                raise
            raise click.ClickException(
                "Code the command ran (the model's or a plugin's) called exit() "
                "with status 0 before the command finished; nothing was "
                "completed."
            ) from None
        except AttnExplainError as error:
            if ctx.params.get("debug") and error.__cause__ is not None:
                # A model's own failure, said in one line: --debug shows where in its code.
                import traceback

                traceback.print_exception(error.__cause__, file=sys.stderr)
            # One line, and no character that rewrites it: messages name the user's files.
            raise click.ClickException(terminal_text(str(error))) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except Exception as error:
            if ctx.find_root().params.get("debug"):
                raise
            text = terminal_text(" ".join(str(error).split()) or type(error).__name__)
            raise click.ClickException(
                f"Unexpected {type(error).__name__}: {text} (rerun with --debug for the traceback)"
            ) from None


@contextmanager
def _library_noise(shown: bool) -> Iterator[None]:
    """Without --debug, Python warnings (TorchScript's deprecation, GoogLeNet's init notice, NaN
    arithmetic) and log records (torch's, with their tracebacks) stay off stderr, so that an error
    is the one line we print."""
    if shown:
        yield
        return
    previous = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(previous)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attnexplain")
@click.option("--debug", is_flag=True, help="Show full tracebacks for unexpected errors.")
def main(debug: bool) -> None:
    """Show where a trained vision model looks.

    \b
    attnexplain run model.pt photo.jpg              # overlay, predictions, report
    attnexplain run torchvision:resnet50:DEFAULT photo.jpg
    attnexplain layers model.pt --arch resnet18      # candidate Grad-CAM layers
    """
