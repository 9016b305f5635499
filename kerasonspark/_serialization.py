"""Models to and from plain data: architecture JSON, compile config JSON, raw float32 weights.

Nothing here pickles a live model. A :class:`ModelSpec` travels to the executors as bytes in the
parameter server's wire format (JSON header + raw weights); custom layers, losses and metrics
are named in ``custom_objects`` and rebuilt by Keras's own deserialisation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import ConfigurationError
from .parameter_server import wire

if TYPE_CHECKING:
    import keras


def get_flat_weights(model: keras.Model) -> np.ndarray:
    """All of the model's weights as one flat, writable float32 array, in ``model.weights`` order.

    The concatenation runs in the backend, so the weights are copied once (``get_weights`` plus
    ``np.concatenate`` copies them twice): this is on every exchange's path.
    """
    from keras import ops

    variables = model.weights
    if not variables:
        return np.zeros(0, np.float32)
    flat = ops.concatenate([ops.reshape(ops.cast(v.value, "float32"), (-1,)) for v in variables])
    return np.asarray(ops.convert_to_numpy(flat), dtype=np.float32)


def global_step(model: keras.Model) -> int:
    """The step the model's optimizer has counted (``optimizer.iterations``; 0 without one)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return 0
    return int(np.asarray(optimizer.iterations))


def set_global_step(model: keras.Model, step: int) -> None:
    """Set ``optimizer.iterations`` of the driver's model to a distributed run's global step.

    The driver's model never runs an optimizer step itself; callbacks that read the step
    (``ModelCheckpoint(save_freq=N)``, MLflow's ``MlflowCallback``, TensorBoard's
    ``steps_per_second``) would otherwise see 0 for the whole run.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        optimizer.iterations.assign(int(step))


def set_flat_weights(model: keras.Model, flat: np.ndarray) -> None:
    """Set the model's weights from a flat float32 array laid out as :func:`get_flat_weights`.

    Assigns variable by variable from views of ``flat``, skipping ``set_weights``' per-call
    validation (about half its cost for the reference CNN).
    """
    variables = model.weights
    expected = sum(int(np.prod(v.shape)) for v in variables)
    if flat.size != expected:
        raise ValueError(f"Expected {expected} weights for this model. Received: {flat.size}.")
    for variable, value in zip(
        variables, wire.unflatten(flat, [tuple(v.shape) for v in variables]), strict=True
    ):
        variable.assign(value)


@dataclass
class ModelSpec:
    """Everything needed to rebuild a compiled model elsewhere.

    Attributes:
        architecture: ``model.to_json()``.
        compile_config: ``model.get_compile_config()`` (``None`` for an uncompiled model).
        weights: the weights, flat float32.
        shapes: the shape of each weight array.
        custom_objects: classes and functions the architecture or compile config name.
    """

    architecture: str
    compile_config: dict[str, Any] | None
    weights: np.ndarray
    shapes: list[tuple[int, ...]]
    custom_objects: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model(
        cls, model: keras.Model, custom_objects: dict[str, Any] | None = None
    ) -> ModelSpec:
        """Capture a built Keras model, with the custom objects it needs.

        The objects registered with ``keras.saving.register_keras_serializable`` that the model
        names are included by themselves; ``custom_objects`` adds those Keras cannot find.

        Raises:
            ConfigurationError: the model is not built (its input shape is unknown) or its compile
                config cannot be serialised.
        """
        if not model.built:
            raise ConfigurationError(
                "The model is not built, so its input shape is unknown. Start it with "
                "`keras.Input(shape=...)` or call `model.build(input_shape)` before training on "
                "Spark."
            )
        compile_config = model.get_compile_config() if getattr(model, "compiled", False) else None
        try:
            json.dumps(compile_config)
        except TypeError as exc:
            raise ConfigurationError(
                f"The model's compile config cannot be serialised ({exc}). Compile with Keras "
                "optimizers, losses and metrics by name or object, registering custom ones with "
                "`keras.saving.register_keras_serializable`."
            ) from None
        weights, shapes = wire.flatten(model.get_weights())
        architecture = model.to_json()
        found = {
            **referenced_custom_objects(architecture, compile_config),
            **(custom_objects or {}),
        }
        return cls(architecture, compile_config, weights, shapes, found)

    @property
    def fingerprint(self) -> str:
        """A short hash of the architecture and compile config (not the weights)."""
        h = hashlib.sha256(self.architecture.encode())
        h.update(json.dumps(self.compile_config, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def build(self, compile: bool = True) -> keras.Model:
        """Rebuild the model with these weights (and compiled, when a compile config exists)."""
        import keras

        with keras.saving.custom_object_scope(self.custom_objects):
            model = keras.models.model_from_json(
                self.architecture, custom_objects=self.custom_objects
            )
            if compile and self.compile_config is not None:
                model.compile_from_config(self.compile_config)
        set_flat_weights(model, self.weights)
        return model

    def to_bytes(self) -> bytes:
        """Serialise (without ``custom_objects``, which travel with the task) to the wire format."""
        parts = wire.encode(
            self.weights,
            self.shapes,
            architecture=self.architecture,
            compile_config=self.compile_config,
        )
        return b"".join(bytes(p) for p in parts)

    @classmethod
    def from_bytes(cls, data: bytes, custom_objects: dict[str, Any] | None = None) -> ModelSpec:
        """Inverse of :meth:`to_bytes`."""
        header, flat = wire.decode(data)
        return cls(
            header["architecture"],
            header["compile_config"],
            flat,
            header["shapes"],
            dict(custom_objects or {}),
        )


def spec_version(spec_bytes: bytes) -> str:
    """A digest of a serialised spec (architecture, compile config and weights): executors keep
    one built model per version."""
    return hashlib.blake2b(spec_bytes, digest_size=16).hexdigest()


def is_custom_loss(compile_config: dict[str, Any] | None) -> bool:
    """Whether the config's loss is one Keras does not ship (a user's function or class)."""
    loss = (compile_config or {}).get("loss")
    return isinstance(loss, dict) and not str(loss.get("module") or "").startswith("keras")


def referenced_custom_objects(
    architecture: str, compile_config: dict[str, Any] | None
) -> dict[str, Any]:
    """The objects registered with ``keras.saving.register_keras_serializable`` that the model's
    architecture or compile config names, by registered name (``"package>Name"``)."""
    import keras

    text = architecture + json.dumps(compile_config)
    return {
        name: obj for name, obj in keras.saving.get_custom_objects().items() if f'"{name}"' in text
    }


def loss_name(compile_config: dict[str, Any] | None) -> str | None:
    """The loss of a Keras compile config as a lowercase name when it is a single loss, else
    ``None``."""
    loss = (compile_config or {}).get("loss")
    if isinstance(loss, str):
        return loss.lower()
    if isinstance(loss, dict):
        name = loss.get("config", {}).get("name") if isinstance(loss.get("config"), dict) else None
        return (name or loss.get("class_name", "")).lower()
    return None
