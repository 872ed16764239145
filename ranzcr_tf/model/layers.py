"""Custom Keras layers of our models, registered so saved ``.keras`` files reload in safe mode.

Every layer here is a plain ``keras.layers.Layer`` subclass written with ``keras.ops`` (runs on the
TensorFlow and JAX backends) and registered under the package name ``"ranzcr_tf"``, so
``keras.models.load_model(path, safe_mode=True)`` rebuilds our models without ``custom_objects``
once ``ranzcr_tf.model.layers`` is imported. A ``keras.layers.Lambda`` would serialise Python bytecode,
which safe mode refuses to load; that is why the channel repeat and the cast are layers of their own.
"""

from __future__ import annotations

import keras
from keras import ops

PACKAGE = "ranzcr_tf"


@keras.saving.register_keras_serializable(package=PACKAGE)
class CastToComputeDtype(keras.layers.Layer):
    """Cast pixels (uint8, float32 or bfloat16, values in [0, 255]) to this layer's compute dtype.

    Keras only auto-casts *floating* inputs to the compute dtype; uint8 pixels straight from the input
    pipeline need an explicit cast. Values are not rescaled: the backbones normalise internally.
    """

    def call(self, inputs):
        return ops.cast(inputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package=PACKAGE)
class RepeatChannels(keras.layers.Layer):
    """Repeat the last (channel) axis ``repeats`` times: a grayscale image for an RGB backbone."""

    def __init__(self, repeats: int = 3, **kwargs):
        super().__init__(**kwargs)
        if int(repeats) < 1:
            raise ValueError(f"RepeatChannels repeats = {repeats}: expected an integer >= 1")
        self.repeats = int(repeats)

    def call(self, inputs):
        return ops.repeat(inputs, self.repeats, axis=-1)

    def compute_output_shape(self, input_shape):
        channels = None if input_shape[-1] is None else input_shape[-1] * self.repeats
        return (*input_shape[:-1], channels)

    def get_config(self):
        return {**super().get_config(), "repeats": self.repeats}


@keras.saving.register_keras_serializable(package=PACKAGE)
class GeMPooling2D(keras.layers.Layer):
    """Generalised-mean pooling over height and width, with a learnable exponent ``p``.

    ``gem(x) = mean(max(x, eps) ** p) ** (1 / p)`` per channel: ``p = 1`` is average pooling and a
    large ``p`` approaches max pooling. ``p`` is clamped at ``min_p`` (1.0 by default) inside ``call``
    so training can never drive it to zero (1/p). The computation runs in float32 even under mixed
    precision because ``x ** 3`` of ordinary activations can overflow float16.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, min_p: float = 1.0, trainable_p: bool = True, **kwargs):
        super().__init__(**kwargs)
        if p <= 0:
            raise ValueError(f"GeMPooling2D p = {p}: expected > 0 (3.0 is the usual start)")
        self.initial_p = float(p)
        self.eps = float(eps)
        self.min_p = float(min_p)
        self.trainable_p = bool(trainable_p)

    def build(self, input_shape):
        self.p = self.add_weight(
            name="p",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_p),
            trainable=self.trainable_p,
            dtype="float32",
        )

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        p = ops.maximum(ops.cast(self.p, "float32"), self.min_p)
        x = ops.power(ops.maximum(x, self.eps), p)
        x = ops.mean(x, axis=(1, 2))
        return ops.cast(ops.power(x, 1.0 / p), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "p": self.initial_p, "eps": self.eps, "min_p": self.min_p,
                "trainable_p": self.trainable_p}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ExclusiveGroupLogits(keras.layers.Layer):
    """Per-label logits whose sigmoids are a softmax over "none of them" and the ``members`` columns.

    For a group of mutually exclusive labels (ETT: Abnormal, Borderline, Normal; at most one per study),
    member ``k`` of the input logits ``z`` becomes ``z_k - logsumexp(0, z_j for the other members j)``, so
    ``sigmoid`` of it is ``exp(z_k) / (1 + sum_j exp(z_j))``: the softmax probability of state k against
    "absent" (logit fixed at 0) and the other states. The group's probabilities sum to at most 1, the
    output keeps one column per label (loss, AUC and submission unchanged); other columns pass through.
    """

    def __init__(self, members=(0, 1, 2), **kwargs):
        super().__init__(**kwargs)
        self.members = [int(m) for m in members]
        if len(self.members) < 2 or len(set(self.members)) != len(self.members) or min(self.members) < 0:
            raise ValueError(f"ExclusiveGroupLogits members = {members}: expected two or more distinct columns")

    def call(self, inputs):
        z = ops.cast(inputs, "float32")
        num_columns, size = z.shape[-1], len(self.members)
        place = ops.one_hot(ops.convert_to_tensor(self.members, "int32"), num_columns, dtype="float32")  # (G, N)
        group = ops.matmul(z, ops.transpose(place))  # (B, G)
        # Row k of (B, G, G + 1): the absent state's 0 and every member but k (k itself pushed to -1e9).
        others = group[:, None, :] - 1e9 * ops.eye(size, dtype="float32")[None]
        others = ops.concatenate([ops.zeros_like(others[..., :1]), others], axis=-1)
        exclusive = group - ops.logsumexp(others, axis=-1)
        return z * (1.0 - ops.sum(place, axis=0)) + ops.matmul(exclusive, place)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "members": self.members}


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaskAttentionPooling(keras.layers.Layer):
    """Per-family attention pooling of a feature map under predicted masks: ``[features, mask_logits]`` ->
    ``(batch, families x channels)``.

    ``features`` ``(B, h, w, C)``; ``mask_logits`` ``(B, H, W, F)`` at a finer grid (H a multiple of h: the
    decoder's stride 4 against the backbone's final stride). The mask probabilities are averaged down to
    ``(h, w)``; family f's vector is the mean of the features weighted by its mask (+ a small constant, so an
    empty mask gives about zero, not a division by zero). Computed in float32.
    """

    def __init__(self, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, inputs):
        features, mask_logits = (ops.cast(x, "float32") for x in inputs)
        factor = mask_logits.shape[1] // features.shape[1]
        attention = ops.sigmoid(mask_logits)
        if factor > 1:
            attention = ops.average_pool(attention, factor, strides=factor, padding="valid")
        pooled = ops.einsum("bhwc,bhwf->bfc", features, attention)
        pooled = pooled / (ops.sum(attention, axis=(1, 2))[..., None] + self.epsilon)
        return ops.cast(ops.reshape(pooled, (-1, pooled.shape[1] * pooled.shape[2])), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        features, masks = input_shape
        return (features[0], features[-1] * masks[-1])

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
