"""Training apps: a Flower ClientApp module and its manifest, known by the hash of both.

A study's training app is reviewed code, as a researcher's script is: the coordinator keeps it
by content hash (``alliance script submit``), every task carries its text, and a site runs it
only when its admin approved that exact hash (``alliance site approve-script``). The site loads
it in process, once per hash, and calls its ``app`` (a ``flwr.clientapp.ClientApp``).
"""

from __future__ import annotations

import ast
import functools
import logging
import os
import threading
import types
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from analyses.scripts import (
    MAX_MANIFEST_BYTES,
    MAX_MODULE_BYTES,
    ScriptBundle,
    content_hash,
    manifest_mapping,
)
from protocol.config import format_validation_error
from protocol.errors import ValidationError

#: The manifest ``kind`` that makes a submitted bundle a training app rather than a script.
TRAINING_KIND = "flower_client_app"


def quiet_flower() -> None:
    """Flower's telemetry and update checks off, before flwr is first imported (and again
    whenever a training task runs, in case a caller imported flwr first)."""
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    # Flower logs every round at INFO (and warns that its own evaluation is off, which is our
    # choice): the round driver and the site's audit log already say what happened.
    logging.getLogger("flwr").setLevel(logging.ERROR)


class TrainingManifest(BaseModel):
    """A training app's manifest: its name, version and what it is for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["flower_client_app"]
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    version: str = Field(min_length=1, max_length=32)
    description: str = Field(default="", max_length=2000)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value

    def describe(self) -> str:
        """The manifest in words, for reviews."""
        return (
            "trains a model on this site's rows (a Flower ClientApp run in the site node's "
            "process); each request names the variables, which the study's approval here "
            "must allow; the framework clips each round's update and adds the noise"
        )


@dataclass(frozen=True)
class TrainingApp:
    """A training app's module and manifest, exactly as submitted."""

    module: str
    manifest_text: str

    def __post_init__(self) -> None:
        if len(self.module.encode()) > MAX_MODULE_BYTES:
            raise ValidationError(f"a training app may have at most {MAX_MODULE_BYTES} bytes")
        if len(self.manifest_text.encode()) > MAX_MANIFEST_BYTES:
            raise ValidationError(
                f"a training app's manifest may have at most {MAX_MANIFEST_BYTES} bytes"
            )

    @functools.cached_property
    def hash(self) -> str:
        """SHA-256 over both texts, length-prefixed, in its own domain (never a script's)."""
        return content_hash(b"alliance-training-app/1\n", self.module, self.manifest_text)

    @functools.cached_property
    def manifest(self) -> TrainingManifest:
        """The manifest, validated.

        Raises:
            ValidationError: what is wrong with it.
        """
        raw = manifest_mapping(self.manifest_text, "training app manifest")
        try:
            return TrainingManifest.model_validate(raw)
        except pydantic.ValidationError as exc:
            raise ValidationError(format_validation_error("training app manifest", exc)) from None

    @functools.cached_property
    def label(self) -> str:
        """How people see it: name, version and the hash's start."""
        try:
            manifest = self.manifest
            return f"training app {manifest.name!r} {manifest.version} (sha256 {self.hash[:12]})"
        except ValidationError:
            return f"training app (sha256 {self.hash[:12]})"

    def check_source(self) -> None:
        """The module parses and assigns ``app`` at top level."""
        try:
            tree = ast.parse(self.module)
        except SyntaxError as exc:
            raise ValidationError(f"training app module: line {exc.lineno}: {exc.msg}") from None
        assigned = {
            target.id
            for node in tree.body
            if isinstance(node, (ast.Assign, ast.AnnAssign))
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Name)
        }
        if "app" not in assigned:
            raise ValidationError(
                "training app module: assigns no `app` at top level (app = ClientApp())"
            )


def is_training_manifest(manifest_text: str) -> bool:
    """Whether a submitted manifest is a training app's (``kind: flower_client_app``)."""
    try:
        raw = yaml.safe_load(manifest_text)
    except yaml.YAMLError:
        return False
    return isinstance(raw, dict) and raw.get("kind") == TRAINING_KIND


def reviewed_bundle(module: str, manifest_text: str) -> ScriptBundle | TrainingApp:
    """The reviewed code a submission is: a training app when its manifest says so, else a
    script."""
    if is_training_manifest(manifest_text):
        return TrainingApp(module, manifest_text)
    return ScriptBundle(module, manifest_text)


_LOADED: dict[str, Any] = {}
_LOAD_LOCK = threading.Lock()


def load_client_app(bundle: TrainingApp) -> Any:
    """The bundle's ``app`` (a ``flwr.clientapp.ClientApp``), its module run once per hash in
    this process. Call only for a hash the site approved.

    Raises:
        ValidationError: the module fails to run or defines no ClientApp ``app``.
    """
    quiet_flower()
    with _LOAD_LOCK:
        found = _LOADED.get(bundle.hash)
        if found is not None:
            return found
        from flwr.clientapp import ClientApp

        module = types.ModuleType(f"alliance_training_app_{bundle.hash[:16]}")
        module.__file__ = f"<{bundle.label}>"
        try:
            exec(compile(bundle.module, module.__file__, "exec"), module.__dict__)
        except Exception as exc:  # the app's own code: any failure is its author's
            raise ValidationError(
                f"{bundle.label} failed to load: {type(exc).__name__}: {exc}"
            ) from None
        app = module.__dict__.get("app")
        if not isinstance(app, ClientApp):
            raise ValidationError(
                f"{bundle.label}: `app` is a {type(app).__name__}, not a flwr ClientApp"
            )
        _LOADED[bundle.hash] = app
        return app


def builtin_app_paths() -> tuple[str, str]:
    """The built-in gradient-descent app's module and manifest files."""
    from pathlib import Path

    here = Path(__file__).parent / "apps"
    return str(here / "gradient_descent.py"), str(here / "gradient_descent.yaml")
