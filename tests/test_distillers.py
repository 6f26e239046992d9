"""The distiller zoo against float64 numpy references written from each module's formula.

The references are deliberately plain (explicit loops over examples, pairs and triplets) so
that they can be checked by eye against the papers; a few values are also pinned to numbers
worked out by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses
from kdjax.distillers import (
    DISTILLERS,
    DistillInputs,
    TrainingSet,
    attention,
    build_distiller,
    combine_terms,
    dkd,
    fitnet,
    kd,
    pkt,
    rkd,
    sp,
    warmup_ramp,
)
from kdjax.distillers.crd import CRD
from kdjax.distillers.crd import nce_loss as _nce_loss
from kdjax.distillers.crd import sample_other_class as _sample_other_class
from kdjax.distillers.fitnet import FitNet, HintRegressor
from kdjax.errors import ConfigError

# On CPU one compilation of a whole loss is several times cheaper than dispatching its
# operations one by one, so the losses under test are jitted once here.
ensemble_soft_kl = jax.jit(kd.ensemble_soft_kl)
hint_loss = jax.jit(fitnet.hint_loss)
attention_map = jax.jit(attention.attention_map)
attention_transfer_loss = jax.jit(attention.attention_transfer_loss)
dkd_terms = jax.jit(dkd.dkd_terms)
normalized_distances = jax.jit(rkd.normalized_distances)
rkd_distance_loss = jax.jit(rkd.rkd_distance_loss)
rkd_angle_loss = jax.jit(rkd.rkd_angle_loss)
pkt_loss = jax.jit(pkt.pkt_loss)
sp_loss = jax.jit(sp.sp_loss)
nce_loss = jax.jit(_nce_loss, static_argnums=1)
sample_other_class = jax.jit(_sample_other_class, static_argnums=2)

RNG = np.random.default_rng(0)
STUDENT = np.array([[1.0, 2.0, 0.5, -1.0], [0.2, -1.0, 1.5, 0.0], [3.0, 0.0, -2.0, 1.0]])
TEACHER_A = np.array([[2.0, 1.0, 0.1, 0.0], [0.0, 0.5, 2.5, -1.0], [1.0, 1.0, -1.0, 2.0]])
TEACHER_B = np.array([[-1.0, 3.0, 0.0, 0.5], [1.0, -2.0, 0.5, 4.0], [2.5, -0.5, 0.0, 0.0]])
LABELS = np.array([1, 2, 0])


def _normal(*shape):
    return RNG.normal(size=shape)


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _softmax64(x):
    return np.exp(_log_softmax64(x))


def _kl64(p, q):
    """sum_c p_c log(p_c / q_c), term by term (p_c = 0 contributes 0)."""
    return sum(pc * np.log(pc / qc) for pc, qc in zip(p, q, strict=True) if pc > 0)


def _normalize64(v):
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def _smooth_l1(x):
    return np.where(np.abs(x) < 1.0, 0.5 * x * x, np.abs(x) - 0.5)


def _as_jnp(features):
    return {k: jnp.asarray(v, jnp.float32) for k, v in features.items()}


def _inputs(student_features, teacher_features, *, batch, mask=None, **fields):
    """A DistillInputs with dummy logits/labels/index unless given."""
    defaults = {
        "student_logits": jnp.zeros((batch, 4)),
        "teacher_logits": jnp.zeros((1, batch, 4)),
        "labels": jnp.zeros((batch,), jnp.int32),
        "index": jnp.arange(batch, dtype=jnp.int32),
    }
    defaults.update({k: jnp.asarray(v) for k, v in fields.items()})
    mask = jnp.ones((batch,), bool) if mask is None else jnp.asarray(mask)
    return DistillInputs(
        student_features=_as_jnp(student_features),
        teacher_features=_as_jnp(teacher_features),
        mask=mask,
        **defaults,
    )


# --------------------------------------------------------------------------------------------
# KD: an ensemble's soft targets are its averaged tempered probabilities.


def ensemble_kl_reference(student, teachers, temperature):
    """T^2 * mean_i KL(mean_k softmax(t_k,i / T) || softmax(s_i / T)), float64."""
    p = np.mean([_softmax64(np.asarray(t) / temperature) for t in teachers], axis=0)
    q = _softmax64(np.asarray(student) / temperature)
    return temperature**2 * np.mean([_kl64(p[i], q[i]) for i in range(len(p))])


def test_ensemble_of_one_is_exactly_soft_kl():
    for temperature in (0.5, 1.0, 4.0):
        one = kd.ensemble_soft_kl(STUDENT, TEACHER_A[None], temperature)  # both eager
        assert float(one) == float(losses.soft_kl(STUDENT, TEACHER_A, temperature))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_ensemble_averages_probabilities_not_logits(temperature):
    teachers = np.stack([TEACHER_A, TEACHER_B])
    value = float(ensemble_soft_kl(STUDENT, teachers, temperature))
    reference = ensemble_kl_reference(STUDENT, teachers, temperature)
    assert value == pytest.approx(reference, rel=1e-5)
    averaged_logits = float(losses.soft_kl(STUDENT, teachers.mean(0), temperature))
    assert abs(value - averaged_logits) > 1e-3


@pytest.mark.parametrize("temperature", [0.05, 1.0, 100.0])
def test_ensemble_soft_kl_is_finite_for_huge_logits(temperature):
    student = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]])
    teachers = np.stack([-student, np.array([[0.0, 1e4, -1e4], [1e4, 0.0, -1e4]])])
    value = float(ensemble_soft_kl(student, teachers, temperature))
    assert np.isfinite(value) and value >= 0.0
    grad = jax.jit(jax.grad(kd.ensemble_soft_kl))(jnp.asarray(student), teachers, temperature)
    assert np.all(np.isfinite(grad))
    if temperature == 100.0:  # probabilities don't underflow: the plain reference holds
        assert value == pytest.approx(ensemble_kl_reference(student, teachers, 100.0), rel=1e-4)


def test_ensemble_soft_kl_is_zero_when_every_teacher_is_the_student():
    teachers = np.stack([STUDENT, STUDENT, STUDENT])
    for temperature in (0.05, 1.0, 100.0):
        value = float(ensemble_soft_kl(STUDENT, teachers, temperature))
        assert value == pytest.approx(0.0, abs=1e-6 * temperature**2)


# --------------------------------------------------------------------------------------------
# FitNets hints.


def test_hint_loss_by_hand_and_mask_drops_a_row():
    regressed = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    teacher = jnp.array([[0.0, 2.0], [3.0, 2.0]])
    # Row 0: ((1-0)^2 + 0^2) / 2 = 0.5; row 1: (0^2 + (4-2)^2) / 2 = 2; mean = 1.25.
    assert float(hint_loss(regressed, teacher)) == pytest.approx(1.25)
    assert float(hint_loss(regressed, teacher, jnp.array([True, False]))) == pytest.approx(0.5)
    assert float(hint_loss(regressed, teacher, jnp.array([False, True]))) == pytest.approx(2.0)


def test_hint_loss_matches_reference_on_feature_maps():
    regressed, teacher = _normal(3, 2, 2, 3), _normal(3, 2, 2, 3)
    per_example = [np.mean((regressed[i] - teacher[i]) ** 2) for i in range(3)]
    assert float(hint_loss(regressed, teacher)) == pytest.approx(np.mean(per_example), rel=1e-5)


@pytest.mark.parametrize(
    "student_shape, teacher_shape",
    [
        ((2, 4, 4, 3), (2, 4, 4, 5)),  # same spatial size
        ((2, 8, 8, 3), (2, 4, 4, 5)),  # larger student map: strided convolution
        ((2, 2, 2, 3), (2, 4, 4, 5)),  # smaller student map: transposed convolution
        ((2, 6), (2, 4)),  # vectors: dense
    ],
)
def test_hint_regressor_maps_to_teacher_shape(student_shape, teacher_shape):
    regressor = HintRegressor(teacher_shape=teacher_shape[1:])
    student = jnp.ones(student_shape)
    variables = jax.jit(regressor.init)(jax.random.key(0), student)
    out = jax.jit(regressor.apply)(variables, student)
    assert out.shape == teacher_shape
    assert np.all(np.asarray(out) >= 0.0)  # ReLU'd, like the teacher's stage outputs


def test_fitnet_terms_are_hint_loss_of_the_regressor():
    student, teacher = {"stage2": _normal(3, 4, 4, 2)}, {"stage2": _normal(3, 2, 2, 3)}
    distiller = FitNet()
    params, _ = distiller.init(jax.random.key(0), student, teacher, TrainingSet(3, LABELS, 3))
    terms, _ = jax.jit(distiller.terms)(
        params, {}, _inputs(student, teacher, batch=3), jax.random.key(1)
    )
    regressed = HintRegressor((2, 2, 3)).apply({"params": params["regressor"]}, student["stage2"])
    expected = np.mean((np.asarray(regressed, np.float64) - teacher["stage2"]) ** 2)
    assert float(terms["hint"]) == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------
# Attention transfer.


def attention_map_reference(features):
    """[b, h, w, c] -> [b, h*w]: the channel mean of squares at each position, L2-normalised."""
    b, h, w, _ = features.shape
    maps = np.zeros((b, h * w))
    for i in range(b):
        for y in range(h):
            for x in range(w):
                maps[i, y * w + x] = np.mean(features[i, y, x] ** 2)
        maps[i] /= np.linalg.norm(maps[i])
    return maps


def avg_pool_reference(features, factor):
    b, h, w, c = features.shape
    out = np.zeros((b, h // factor, w // factor, c))
    for y in range(h // factor):
        for x in range(w // factor):
            window = features[:, y * factor : (y + 1) * factor, x * factor : (x + 1) * factor]
            out[:, y, x] = window.mean(axis=(1, 2))
    return out


def at_reference(student, teacher):
    height = min(student.shape[1], teacher.shape[1])
    student = avg_pool_reference(student, student.shape[1] // height)
    teacher = avg_pool_reference(teacher, teacher.shape[1] // height)
    diff = attention_map_reference(student) - attention_map_reference(teacher)
    return np.mean([np.mean(diff[i] ** 2) for i in range(len(diff))])


def test_attention_map_by_hand():
    # One example, 1x2 positions, 2 channels: position 0 has channels (1, 1) -> mean square 1,
    # position 1 has (2, 2) -> 4; normalised: [1, 4] / sqrt(17) = [0.242536, 0.970143].
    features = jnp.array([[[[1.0, 1.0], [2.0, 2.0]]]])
    np.testing.assert_allclose(attention_map(features), [[0.2425356, 0.9701425]], rtol=1e-6)
    # Teacher with the positions swapped: map [4, 1] / sqrt(17); the difference is
    # [-3, 3] / sqrt(17), so the loss is mean(9/17, 9/17) = 9/17 = 0.529412.
    swapped = jnp.array([[[[2.0, 2.0], [1.0, 1.0]]]])
    assert float(attention_transfer_loss(features, swapped)) == pytest.approx(9 / 17, rel=1e-6)


def test_attention_map_matches_reference():
    features = _normal(3, 3, 4, 5)
    np.testing.assert_allclose(
        attention_map(features), attention_map_reference(features), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize(
    "student_shape, teacher_shape",
    [
        ((3, 4, 4, 2), (3, 4, 4, 5)),  # same size
        ((3, 4, 4, 2), (3, 2, 2, 5)),  # the student's map is 2x larger: pool it
        ((3, 2, 2, 2), (3, 4, 4, 5)),  # the teacher's map is 2x larger: pool it
    ],
)
def test_attention_transfer_loss_matches_reference(student_shape, teacher_shape):
    student, teacher = _normal(*student_shape), _normal(*teacher_shape)
    value = float(attention_transfer_loss(student, teacher))
    assert value == pytest.approx(at_reference(student, teacher), rel=1e-5)


def test_attention_transfer_mask_drops_rows():
    student, teacher = _normal(4, 2, 2, 3), _normal(4, 2, 2, 3)
    mask = np.array([True, False, True, False])
    value = float(attention_transfer_loss(student, teacher, jnp.asarray(mask)))
    assert value == pytest.approx(at_reference(student[mask], teacher[mask]), rel=1e-5)


def test_attention_transfer_rejects_sizes_not_a_whole_multiple():
    with pytest.raises(ValueError, match="whole-number"):
        attention_transfer_loss(jnp.ones((2, 6, 6, 2)), jnp.ones((2, 4, 4, 2)))


def test_attention_distiller_sums_stage_pairs():
    student = {"stage1": _normal(3, 4, 4, 2), "stage2": _normal(3, 2, 2, 3)}
    teacher = {"stage1": _normal(3, 4, 4, 3), "stage2": _normal(3, 2, 2, 4)}
    distiller = DISTILLERS.get("at")()
    terms, _ = jax.jit(distiller.terms)(
        {}, {}, _inputs(student, teacher, batch=3), jax.random.key(0)
    )
    expected = sum(at_reference(student[k], teacher[k]) for k in ("stage1", "stage2"))
    assert float(terms["at"]) == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------
# DKD.


def dkd_reference(student, teacher, labels, temperature):
    """mdistiller's form: the binary (target, non-target) KL and the KL of the softmax over the
    non-target classes only, each times T^2 and averaged over the batch."""
    p, q = _softmax64(teacher / temperature), _softmax64(student / temperature)
    tckd, nckd = [], []
    for i, y in enumerate(labels):
        others = [c for c in range(p.shape[1]) if c != y]
        binary_p = [p[i, y], sum(p[i, c] for c in others)]
        binary_q = [q[i, y], sum(q[i, c] for c in others)]
        tckd.append(_kl64(binary_p, binary_q))
        p_hat = _softmax64(teacher[i, others] / temperature)
        q_hat = _softmax64(student[i, others] / temperature)
        nckd.append(_kl64(p_hat, q_hat))
    return temperature**2 * np.mean(tckd), temperature**2 * np.mean(nckd)


def _teacher_log_probs(teacher, temperature):
    return jax.nn.log_softmax(jnp.asarray(teacher, jnp.float32) / temperature, axis=-1)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_terms_match_mdistiller_reference(temperature):
    tckd, nckd = dkd_terms(
        STUDENT, _teacher_log_probs(TEACHER_A, temperature), jnp.asarray(LABELS), temperature
    )
    ref_tckd, ref_nckd = dkd_reference(STUDENT, TEACHER_A, LABELS, temperature)
    assert float(tckd) == pytest.approx(ref_tckd, rel=1e-5)
    assert float(nckd) == pytest.approx(ref_nckd, rel=1e-5)


@pytest.mark.parametrize("i", [0, 1, 2])
def test_dkd_decomposes_kl(i):
    # Zhao et al. (2022), eq. 5: KL(p || q) = TCKD + (1 - p_target) * NCKD, per example.
    s, t, y = STUDENT[i : i + 1], TEACHER_A[i : i + 1], LABELS[i : i + 1]
    tckd, nckd = dkd_terms(s, _teacher_log_probs(t, 1.0), jnp.asarray(y), 1.0)
    p_target = _softmax64(t)[0, y[0]]
    kl = float(losses.soft_kl(s, t, 1.0))
    assert float(tckd) + (1.0 - p_target) * float(nckd) == pytest.approx(kl, rel=1e-5)


def test_dkd_is_finite_for_confident_logits():
    student, teacher = 1e3 * STUDENT, 1e3 * TEACHER_B
    for temperature in (1.0, 4.0):
        log_p = _teacher_log_probs(teacher, temperature)
        terms = dkd_terms(student, log_p, jnp.asarray(LABELS), temperature)
        assert all(np.isfinite(float(v)) and float(v) >= 0.0 for v in terms)
        grad = jax.jit(jax.grad(lambda s, lp, t: sum(dkd_terms(s, lp, LABELS, t))))(
            jnp.asarray(student), log_p, temperature
        )
        assert np.all(np.isfinite(grad))


# --------------------------------------------------------------------------------------------
# RKD.


def distances_reference(e):
    b = len(e)
    d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(b)] for i in range(b)])
    return d / d[d > 0].mean()


def rkd_distance_reference(student, teacher):
    diff = distances_reference(student) - distances_reference(teacher)
    return np.mean(_smooth_l1(diff))  # every pair, the diagonal included


def angles_reference(e):
    b = len(e)
    angles = np.zeros((b, b, b))
    for i in range(b):
        for j in range(b):
            for k in range(b):
                u, v = _normalize64(e[j] - e[i]), _normalize64(e[k] - e[i])
                angles[i, j, k] = u @ v
    return angles


def rkd_angle_reference(student, teacher):
    return np.mean(_smooth_l1(angles_reference(student) - angles_reference(teacher)))


def test_normalized_distances_match_reference():
    e = _normal(4, 3)
    np.testing.assert_allclose(
        normalized_distances(e, jnp.ones(4, bool)), distances_reference(e), rtol=1e-5, atol=1e-6
    )
    # A 3-4-5 right triangle plus a repeat of its second corner: the distances are
    # d01 = 3, d02 = 4, d03 = 3, d12 = 5, d13 = 0, d23 = 5; the positive ones average
    # (3 + 4 + 3 + 5 + 5) / 5 = 4, so d02 -> 1, d12 -> 1.25, d01 -> 0.75 and d13 stays 0.
    e = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [3.0, 0.0]])
    d = np.asarray(normalized_distances(e, jnp.ones(4, bool)))
    assert (d[0, 2], d[1, 2], d[0, 1], d[1, 3]) == pytest.approx((1.0, 1.25, 0.75, 0.0), rel=1e-6)


def test_rkd_losses_match_loop_references():
    # Scaled so that some differences exceed the smooth-L1 threshold of 1.
    student, teacher = _normal(5, 3), _normal(5, 4)
    teacher[0] *= 6.0
    mask = jnp.ones(5, bool)
    distance = float(rkd_distance_loss(student, teacher, mask))
    assert distance == pytest.approx(rkd_distance_reference(student, teacher), rel=1e-5)
    assert np.any(np.abs(distances_reference(student) - distances_reference(teacher)) > 1.0)
    angle = float(rkd_angle_loss(student, teacher, mask))
    assert angle == pytest.approx(rkd_angle_reference(student, teacher), rel=1e-5)


def test_rkd_gradients_are_finite_for_identical_embeddings():
    student, teacher = _normal(4, 3), _normal(4, 3)
    student[2] = student[1]
    mask = jnp.ones(4, bool)
    for loss in (rkd_distance_loss, rkd_angle_loss):
        assert np.isfinite(float(loss(student, teacher, mask)))
        grad = jax.jit(jax.grad(loss))(jnp.asarray(student, jnp.float32), teacher, mask)
        assert np.all(np.isfinite(grad)), loss.__name__
    assert float(rkd_distance_loss(student, teacher, mask)) == pytest.approx(
        rkd_distance_reference(student, teacher), rel=1e-5
    )
    assert float(rkd_angle_loss(student, teacher, mask)) == pytest.approx(
        rkd_angle_reference(student, teacher), rel=1e-5
    )


# --------------------------------------------------------------------------------------------
# PKT and SP.


def pkt_reference(student, teacher, eps=1e-7):
    def conditional(e):
        b = len(e)
        c = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                cosine = e[i] @ e[j] / (np.linalg.norm(e[i]) * np.linalg.norm(e[j]))
                c[i, j] = (cosine + 1.0) / 2.0
        return c / c.sum(axis=1, keepdims=True)

    p, q = conditional(teacher), conditional(student)
    b = len(p)
    total = sum(
        p[i, j] * np.log((p[i, j] + eps) / (q[i, j] + eps)) for i in range(b) for j in range(b)
    )
    return total / b**2


def sp_reference(student, teacher):
    def similarity(f):
        f = f.reshape(len(f), -1)
        gram = f @ f.T
        return gram / np.linalg.norm(gram, axis=1, keepdims=True)

    b = len(student)
    return np.sum((similarity(student) - similarity(teacher)) ** 2) / b**2


def test_pkt_loss_matches_reference_and_vanishes_on_the_teacher():
    student, teacher = _normal(4, 3), _normal(4, 5)
    mask = jnp.ones(4, bool)
    value = float(pkt_loss(student, teacher, mask))
    assert value == pytest.approx(pkt_reference(student, teacher), rel=1e-4)
    assert float(pkt_loss(teacher, teacher, mask)) == pytest.approx(0.0, abs=1e-7)


def test_sp_loss_matches_reference_and_ignores_feature_scale():
    student, teacher = _normal(4, 2, 2, 3), _normal(4, 2, 2, 5)
    mask = jnp.ones(4, bool)
    value = float(sp_loss(student, teacher, mask))
    assert value == pytest.approx(sp_reference(student, teacher), rel=1e-5)
    assert float(sp_loss(7.5 * student, teacher, mask)) == pytest.approx(value, rel=1e-5)
    assert float(sp_loss(student, 0.01 * teacher, mask)) == pytest.approx(value, rel=1e-5)
    assert float(sp_loss(teacher, teacher, mask)) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------
# CRD.

CRD_LABELS = np.array([0, 2, 1, 0, 1, 1, 2, 0, 0, 1, 2, 1])  # uneven, unsorted classes


def test_nce_loss_on_a_hand_made_score_matrix():
    scores = np.array([[0.5, 0.1, 0.2], [1.0, 0.05, 0.3]])
    num_examples = 10  # K = 2 negatives: noise K / N = 0.2
    expected = []
    for row in scores:
        positive = -np.log(row[0] / (row[0] + 0.2))
        negatives = -sum(np.log(0.2 / (h + 0.2)) for h in row[1:])
        expected.append(positive + negatives)
    assert float(nce_loss(scores, num_examples)) == pytest.approx(np.mean(expected), rel=1e-5)
    # Row 0 alone: -log(0.5/0.7) - log(0.2/0.3) - log(0.2/0.4) = 0.336472 + 0.405465 + 0.693147.
    row0 = nce_loss(scores, num_examples, jnp.array([True, False]))
    assert float(row0) == pytest.approx(1.435084, rel=1e-5)


def _crd_setup(batch_index, *, negatives=5, embed_dim=4, momentum=0.5):
    distiller = CRD(embed_dim=embed_dim, negatives=negatives, momentum=momentum)
    training_set = TrainingSet(len(CRD_LABELS), CRD_LABELS, 3)
    batch = len(batch_index)
    student = {"pre_logits": _normal(batch, 6)}
    teacher = {"pre_logits": _normal(batch, 5)}
    params, buffers = distiller.init(jax.random.key(0), student, teacher, training_set)
    inputs = _inputs(
        student,
        teacher,
        batch=batch,
        labels=jnp.asarray(CRD_LABELS[batch_index], jnp.int32),
        index=jnp.asarray(batch_index, jnp.int32),
    )
    return distiller, params, buffers, inputs


def test_sample_other_class_draws_every_other_class_index_only():
    _, _, buffers, _ = _crd_setup([0, 1, 2])
    labels = jnp.arange(3, dtype=jnp.int32)
    drawn = np.asarray(sample_other_class(jax.random.key(3), labels, 400, buffers["by_class"]))
    assert drawn.shape == (3, 400)
    for row, label in enumerate(range(3)):
        others = set(np.flatnonzero(CRD_LABELS != label))
        assert set(drawn[row]) == others  # never its own class, every other example hit


def test_crd_init_shapes():
    distiller, params, buffers, _ = _crd_setup([0, 1, 2])
    assert set(params) == {"embed_student", "embed_teacher"}
    assert params["embed_student"]["Dense_0"]["kernel"].shape == (6, 4)
    assert params["embed_teacher"]["Dense_0"]["kernel"].shape == (5, 4)
    assert buffers["memory_student"].shape == (12, 4)
    assert buffers["memory_teacher"].shape == (12, 4)
    assert float(buffers["z_student"]) == -1.0 and float(buffers["z_teacher"]) == -1.0
    np.testing.assert_array_equal(buffers["by_class"]["size"], [4, 5, 3])
    np.testing.assert_array_equal(buffers["by_class"]["start"], [0, 4, 9])
    with pytest.raises(ValueError, match="other classes"):
        distiller.init(
            jax.random.key(0),
            {"pre_logits": jnp.ones((2, 6))},
            {"pre_logits": jnp.ones((2, 5))},
            TrainingSet(4, np.zeros(4, int), 2),
        )


def _embed64(params, x):
    dense = params["Dense_0"]
    z = np.asarray(x, np.float64) @ np.asarray(dense["kernel"], np.float64) + np.asarray(
        dense["bias"], np.float64
    )
    return np.stack([_normalize64(row) for row in z])


def crd_reference(params, buffers, inputs, negatives_index, mask, tau=0.07):
    """(loss, z_student, z_teacher, v_s, v_t) from the module doc, over the valid rows only,
    with Z fixed from this batch when the buffers' are negative."""
    n = buffers["memory_student"].shape[0]
    v_s = _embed64(params["embed_student"], inputs.student_features["pre_logits"])
    v_t = _embed64(params["embed_teacher"], inputs.teacher_features["pre_logits"])
    index = np.concatenate([np.asarray(inputs.index)[:, None], negatives_index], axis=1)[mask]

    def nce(anchor, memory, z):
        memory = np.asarray(memory, np.float64)
        scores = np.array(
            [[np.exp(memory[k] @ anchor[i] / tau) for k in row] for i, row in enumerate(index)]
        )
        z = scores.mean() * n if z < 0 else z
        h = scores / z
        noise = (h.shape[1] - 1) / n
        per_row = [
            -np.log(r[0] / (r[0] + noise)) - sum(np.log(noise / (x + noise)) for x in r[1:])
            for r in h
        ]
        return np.mean(per_row), z

    loss_s, z_t = nce(v_s[mask], buffers["memory_teacher"], float(buffers["z_teacher"]))
    loss_t, z_s = nce(v_t[mask], buffers["memory_student"], float(buffers["z_student"]))
    return loss_s + loss_t, z_s, z_t, v_s, v_t


def test_crd_terms_match_reference_and_update_the_memory():
    batch_index = np.array([0, 5, 7, 10])
    distiller, params, buffers, inputs = _crd_setup(batch_index)
    key = jax.random.key(7)
    negatives = np.asarray(sample_other_class(key, inputs.labels, 5, buffers["by_class"]))
    mask = np.ones(4, bool)
    loss, z_s, z_t, v_s, v_t = crd_reference(params, buffers, inputs, negatives, mask)

    terms, after = jax.jit(distiller.terms)(params, buffers, inputs, key)
    assert float(terms["crd"]) == pytest.approx(loss, rel=1e-4)
    assert float(after["z_student"]) == pytest.approx(z_s, rel=1e-4) and z_s > 0
    assert float(after["z_teacher"]) == pytest.approx(z_t, rel=1e-4) and z_t > 0
    others = np.setdiff1d(np.arange(12), batch_index)
    for side, v in (("student", v_s), ("teacher", v_t)):
        old = np.asarray(buffers[f"memory_{side}"], np.float64)
        new = np.asarray(after[f"memory_{side}"])
        for row, i in enumerate(batch_index):
            expected = _normalize64(0.5 * old[i] + 0.5 * v[row])
            np.testing.assert_allclose(new[i], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(new[others], old[others])

    # Z stays fixed on the next call; the loss now reads the updated memory.
    key2 = jax.random.key(8)
    terms2, again = jax.jit(distiller.terms)(params, after, inputs, key2)
    assert float(again["z_student"]) == float(after["z_student"])
    assert float(again["z_teacher"]) == float(after["z_teacher"])
    negatives2 = np.asarray(sample_other_class(key2, inputs.labels, 5, after["by_class"]))
    loss2 = crd_reference(params, after, inputs, negatives2, mask)[0]
    assert float(terms2["crd"]) == pytest.approx(loss2, rel=1e-4)


def test_crd_ignores_padding_rows():
    # Padding as the evaluation batches make it: index 0, which a valid row also holds.
    batch_index = np.array([3, 0, 8, 0, 0])
    mask = np.array([True, True, True, False, False])
    distiller, params, buffers, inputs = _crd_setup(batch_index)
    inputs = inputs._replace(
        student_features={k: v.at[3:].set(1e3) for k, v in inputs.student_features.items()},
        teacher_features={k: v.at[3:].set(-1e3) for k, v in inputs.teacher_features.items()},
        mask=jnp.asarray(mask),
    )
    key = jax.random.key(5)
    negatives = np.asarray(sample_other_class(key, inputs.labels, 5, buffers["by_class"]))
    loss, z_s, z_t, v_s, v_t = crd_reference(params, buffers, inputs, negatives, mask)

    terms, after = jax.jit(distiller.terms)(params, buffers, inputs, key)
    # Before the fix, Z averaged the padding rows' scores too, and row 0's update was
    # overwritten by the padding rows writing back its old value.
    assert float(terms["crd"]) == pytest.approx(loss, rel=1e-4)
    assert float(after["z_student"]) == pytest.approx(z_s, rel=1e-4)
    assert float(after["z_teacher"]) == pytest.approx(z_t, rel=1e-4)
    untouched = np.setdiff1d(np.arange(12), batch_index)
    for side, v in (("student", v_s), ("teacher", v_t)):
        old = np.asarray(buffers[f"memory_{side}"], np.float64)
        new = np.asarray(after[f"memory_{side}"])
        for row, i in enumerate(batch_index[mask]):
            expected = _normalize64(0.5 * old[i] + 0.5 * v[row])
            np.testing.assert_allclose(new[i], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(new[untouched], old[untouched])


# --------------------------------------------------------------------------------------------
# Masks: padding rows never move a loss.

MASK_FEATURES = {
    "student": {"stage1": (4, 4, 2), "stage2": (2, 2, 3), "pre_logits": (5,)},
    "teacher": {"stage1": (4, 4, 3), "stage2": (2, 2, 4), "pre_logits": (6,)},
}


@pytest.mark.parametrize("name", ["kd", "fitnet", "at", "dkd", "rkd", "pkt", "sp"])
def test_padding_rows_do_not_change_the_terms(name):
    valid, padded = 4, 6
    features = {
        whose: {k: _normal(padded, *shape) for k, shape in shapes.items()}
        for whose, shapes in MASK_FEATURES.items()
    }
    for whose in features.values():  # garbage in the padding rows
        for value in whose.values():
            value[valid:] = 1e3 * _normal(*value[valid:].shape)
    logits = {"student_logits": 3 * _normal(padded, 4), "teacher_logits": 3 * _normal(2, padded, 4)}
    logits["student_logits"][valid:] = 1e4
    labels = np.array([1, 3, 0, 2, 0, 0], np.int32)
    mask = np.arange(padded) < valid

    distiller = DISTILLERS.get(name)()
    full = _inputs(
        features["student"], features["teacher"], batch=padded, mask=mask, labels=labels, **logits
    )
    if name != "kd" and name != "dkd":  # feature methods take one teacher
        full = full._replace(teacher_logits=full.teacher_logits[:1])
    trimmed = DistillInputs(
        student_logits=full.student_logits[:valid],
        student_features={k: v[:valid] for k, v in full.student_features.items()},
        teacher_logits=full.teacher_logits[:, :valid],
        teacher_features={k: v[:valid] for k, v in full.teacher_features.items()},
        labels=full.labels[:valid],
        mask=full.mask[:valid],
        index=full.index[:valid],
    )
    params, buffers = distiller.init(
        jax.random.key(0),
        trimmed.student_features,
        trimmed.teacher_features,
        TrainingSet(padded, labels, 4),
    )
    key = jax.random.key(1)
    terms_full, _ = jax.jit(distiller.terms)(params, buffers, full, key)
    terms_valid, _ = jax.jit(distiller.terms)(params, buffers, trimmed, key)
    assert set(terms_full) == set(distiller.term_names)
    for term in distiller.term_names:
        assert np.isfinite(float(terms_full[term])), term
        assert float(terms_full[term]) == pytest.approx(float(terms_valid[term]), rel=1e-5), term


# --------------------------------------------------------------------------------------------
# Gradients: the teacher's features are constants; the student's carry the gradient.

GRADIENT_FEATURES = {
    "fitnet": ({"stage2": (4, 4, 2)}, {"stage2": (2, 2, 3)}),
    "at": ({"stage1": (4, 4, 2), "stage2": (2, 2, 2)}, {"stage1": (4, 4, 3), "stage2": (2, 2, 3)}),
    "rkd": ({"pre_logits": (5,)}, {"pre_logits": (6,)}),
    "pkt": ({"pre_logits": (5,)}, {"pre_logits": (6,)}),
    "sp": ({"stage2": (2, 2, 3)}, {"stage2": (2, 2, 4)}),
}


@pytest.mark.parametrize("name", sorted(GRADIENT_FEATURES))
def test_no_gradient_reaches_the_teacher_features(name):
    batch = 4
    student_shapes, teacher_shapes = GRADIENT_FEATURES[name]
    student = {k: jnp.asarray(_normal(batch, *s), jnp.float32) for k, s in student_shapes.items()}
    teacher = {k: jnp.asarray(_normal(batch, *s), jnp.float32) for k, s in teacher_shapes.items()}
    distiller = DISTILLERS.get(name)()
    params, buffers = distiller.init(
        jax.random.key(0), student, teacher, TrainingSet(batch, LABELS, 3)
    )
    inputs = _inputs(student, teacher, batch=batch)
    key = jax.random.key(1)

    def total(student_features, teacher_features):
        both = inputs._replace(student_features=student_features, teacher_features=teacher_features)
        terms, _ = distiller.terms(params, buffers, both, key)
        return sum(terms.values())

    grad_student, grad_teacher = jax.jit(jax.grad(total, argnums=(0, 1)))(student, teacher)
    for value in jax.tree_util.tree_leaves(grad_teacher):
        assert np.all(np.asarray(value) == 0.0)
    for value in jax.tree_util.tree_leaves(grad_student):
        assert np.all(np.isfinite(value)) and np.any(np.asarray(value) != 0.0)


# --------------------------------------------------------------------------------------------
# Combining terms, the warm-up ramp, and building a distiller from a config section.


def test_combine_terms_ramps_every_teacher_term_but_ce():
    terms = {"ce": jnp.float32(2.0), "tckd": jnp.float32(3.0), "nckd": jnp.float32(0.5)}
    weights = {"ce": 1.0, "tckd": 0.5, "nckd": 8.0}
    total, weighted = combine_terms(terms, weights, jnp.float32(0.25))
    # 1 * 2 + 0.25 * (0.5 * 3 + 8 * 0.5) = 2 + 0.25 * 5.5 = 3.375.
    assert float(total) == pytest.approx(3.375)
    assert float(weighted["ce_weighted"]) == pytest.approx(2.0)
    assert float(weighted["tckd_weighted"]) == pytest.approx(0.375)
    assert float(weighted["nckd_weighted"]) == pytest.approx(1.0)
    total, _ = combine_terms(terms, weights, jnp.float32(1.0))
    assert float(total) == pytest.approx(sum(weights[k] * float(v) for k, v in terms.items()))


def test_warmup_ramp():
    # 20 epochs of 10 steps: linear per step, equal to mdistiller's epoch / 20 at each epoch's
    # last step, full weight from step 199 on.
    assert float(warmup_ramp(jnp.array(0), 10, 20)) == pytest.approx(1 / 200)
    assert float(warmup_ramp(jnp.array(9), 10, 20)) == pytest.approx(1 / 20)
    assert float(warmup_ramp(jnp.array(99), 10, 20)) == pytest.approx(0.5)
    assert float(warmup_ramp(jnp.array(199), 10, 20)) == 1.0
    assert float(warmup_ramp(jnp.array(2399), 10, 20)) == 1.0
    assert float(warmup_ramp(jnp.array(0), 10, 0)) == 1.0
    # A warm-up of one epoch still starts near 0.
    assert float(warmup_ramp(jnp.array(0), 100, 1)) == pytest.approx(0.01)


def test_build_distiller_defaults():
    spec = build_distiller({"name": "kd"})
    assert spec.weights == {"ce": 0.1, "kd": 0.9}
    assert spec.warmup_epochs == 0.0 and spec.distiller.temperature == 4.0
    spec = build_distiller({"name": "dkd"})
    assert spec.weights == {"ce": 1.0, "tckd": 1.0, "nckd": 8.0}
    assert spec.warmup_epochs == 20.0 and spec.distiller.temperature == 4.0
    expected = {
        "fitnet": {"ce": 1.0, "hint": 100.0},
        "at": {"ce": 1.0, "at": 1000.0},
        "rkd": {"ce": 1.0, "rkd_distance": 25.0, "rkd_angle": 50.0},
        "pkt": {"ce": 1.0, "pkt": 30000.0},
        "sp": {"ce": 1.0, "sp": 3000.0},
        "crd": {"ce": 1.0, "crd": 0.8},
    }
    for name, weights in expected.items():
        assert build_distiller({"name": name}).weights == weights, name


def test_build_distiller_overrides():
    spec = build_distiller(
        {"name": "dkd", "weights": {"nckd": 2}, "warmup_epochs": 0, "temperature": 1.5}
    )
    assert spec.weights == {"ce": 1.0, "tckd": 1.0, "nckd": 2.0}
    assert spec.warmup_epochs == 0.0 and spec.distiller.temperature == 1.5
    spec = build_distiller(
        {"name": "at", "student_features": ["stage3"], "teacher_features": ["x"]}
    )
    assert spec.distiller.student_features == ("stage3",)
    assert spec.distiller.teacher_features == ("x",)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"name": "kd", "weights": {"kdd": 1.0}}, r"weights\.kdd.*did you mean 'kd'"),
        ({"name": "kd", "temprature": 2.0}, r"temprature.*did you mean 'temperature'"),
        ({"name": "kd", "weights": {"kd": -0.5}}, r"weights\.kd=-0\.5 must be a number >= 0"),
        ({"name": "kd", "warmup_epochs": -1}, r"warmup_epochs=-1\.0 must be >= 0"),
        ({"weights": {"kd": 1.0}}, r"name is missing.*dkd"),
        ({"name": "fitnets"}, r"unknown distiller 'fitnets'.*Did you mean 'fitnet'"),
        ({"name": "at", "student_features": ["stage1"]}, r"same number"),
    ],
)
def test_build_distiller_errors(section, message):
    with pytest.raises(ConfigError, match=message):
        build_distiller(section)
