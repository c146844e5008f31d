"""Researchers' scripts: the manifest, the hash, clipping, and the site's review by hash."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analyses.scripts import ScriptBundle, ScriptManifest, clip_contributions
from protocol.errors import RecordError, ValidationError
from site_node.runtime import SiteRuntime
from tests.unit.test_site_runtime import make_site

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SCRIPTS = Path(__file__).resolve().parents[2] / "configs" / "scripts"


def bundle(name: str) -> ScriptBundle:
    return ScriptBundle(
        (SCRIPTS / f"{name}.py").read_text(), (SCRIPTS / f"{name}.yaml").read_text()
    )


def manifest(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": "m",
        "version": "1",
        "variables": ["age"],
        "k": 2,
        "bound": {"norm": "l1", "value": 10},
        "mode": "dp",
    }
    return {**base, **changes}


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"bound": {"norm": "l2", "value": [1, 2]}}, "an l2 bound is one number"),
        ({"bound": {"norm": "per_coordinate", "value": [1]}}, "lists k = 2 values"),
        ({"bound": {"norm": "l1", "value": float("inf")}}, "finite numbers above 0"),
        ({"counts": [2]}, "counts are distinct coordinates in 0..1"),
        ({"k": 0}, "k"),
        ({"rounds": 51}, "rounds"),
        ({"initial_state": {"beta": [float("inf")]}}, "finite number"),
        ({"extra": 1}, "extra"),
    ],
)
def test_a_bad_manifest_is_refused_naming_the_field(changes, words):
    with pytest.raises(Exception) as caught:
        ScriptManifest.model_validate(manifest(**changes))
    assert words in str(caught.value)


def test_one_changed_byte_is_a_new_hash_and_no_byte_moves_between_the_texts():
    original = bundle("weighted_mean")
    changed = ScriptBundle(original.module.replace("weight", "weigHt", 1), original.manifest_text)
    assert changed.hash != original.hash
    # Moving the boundary between module and manifest changes the hash too.
    moved = ScriptBundle(original.module + original.manifest_text[:1], original.manifest_text[1:])
    assert moved.hash != original.hash


def test_clipping_scales_an_l1_contribution_down_and_clamps_per_coordinate():
    m = ScriptManifest.model_validate(manifest())
    values = np.array([[3.0, 4.0], [30.0, -10.0]])
    clipped, touched = clip_contributions(values, m, 2)
    assert touched == 1
    np.testing.assert_allclose(clipped[0], [3.0, 4.0])
    np.testing.assert_allclose(np.abs(clipped[1]).sum(), 10.0)
    np.testing.assert_allclose(clipped[1], [7.5, -2.5])
    per = ScriptManifest.model_validate(manifest(bound={"norm": "per_coordinate", "value": [1, 5]}))
    clipped, touched = clip_contributions(values, per, 2)
    np.testing.assert_allclose(clipped, [[1.0, 4.0], [1.0, -5.0]])
    assert touched == 2


@pytest.mark.parametrize(
    ("values", "words"),
    [
        (np.ones((3, 2)), "one row per record and k = 2 columns"),
        (np.ones(4), "one row per record and k = 2 columns"),
        (np.array([[1.0, np.nan], [0.0, 0.0]]), "non-finite"),
        (np.array([[2.0, 0.0], [0.0, 0.0]]), "other than 0 or 1"),
    ],
)
def test_a_wrong_contribution_is_refused_without_its_values(values, words):
    m = ScriptManifest.model_validate(manifest(counts=[0]))
    with pytest.raises(RecordError) as caught:
        clip_contributions(values, m, 2)
    assert words in str(caught.value)
    assert "2.0" not in str(caught.value)


def test_a_script_must_define_both_functions():
    broken = ScriptBundle(
        "def per_record(frame):\n    return 1\n", bundle("odds_ratio").manifest_text
    )
    with pytest.raises(ValidationError, match="defines no combine function"):
        broken.check_source()


# ----------------------------------------------------------------------------- the site


def script_task(b: ScriptBundle, task_id: str = "t1", mode: str = "sdc", epsilon: float = 0.0):
    from protocol.wire import alliance_pb2 as pb

    params = {"hash": b.hash, "module": b.module, "manifest": b.manifest_text}
    return pb.Task(
        task_id=task_id,
        study_id="s1",
        request_id=task_id,
        analysis="script",
        privacy_mode=mode,
        epsilon=epsilon,
        researcher="r.chen",
        params_json=json.dumps(params),
    )


def script_site(tmp_path: Path, frame: pd.DataFrame, heart_dict, mode: str = "sdc") -> SiteRuntime:
    policy = {
        "allowed_analyses": ["script"],
        "studies": [{"id": "s1", "mode": mode, "budget": 5.0, "epsilon_per_request": 1.0}],
        "scripts": {"cpu_seconds": 2, "memory_mb": 256, "wall_seconds": 20},
    }
    return make_site(tmp_path, frame, heart_dict, policy)


def test_a_site_runs_only_approved_hashes_and_one_changed_byte_needs_a_new_review(
    tmp_path, heart_frames, heart_dict
):
    site = script_site(tmp_path, heart_frames["cleveland"], heart_dict)
    original = bundle("odds_ratio")
    first = site.handle(script_task(original, "t1"))
    assert first.status == "refused" and first.message.refusal.code == "script"
    assert f"alliance site approve-script {original.hash}" in first.message.refusal.reason
    assert site.store.script_status(original.hash) == "pending"  # kept for review
    site.store.decide_script(original.hash, True, "it.cleveland")
    approved = site.handle(script_task(original, "t2"))
    assert approved.status == "reply"
    # Reference: the 2x2 table counted with pandas on Cleveland's rows.
    rows = heart_frames["cleveland"].dropna(subset=["sex", "num"])
    male, disease = rows.sex == 1, rows.num > 0
    expected = [
        (male & disease).sum(),
        (male & ~disease).sum(),
        (~male & disease).sum(),
        (~male & ~disease).sum(),
    ]
    record = {a.name: list(a.values) for a in approved.message.reply.record.arrays}
    assert record["total"] == [float(v) for v in expected]
    changed = ScriptBundle(original.module + "\n", original.manifest_text)
    again = site.handle(script_task(changed, "t3"))
    assert again.status == "refused" and again.message.refusal.code == "script"
    assert changed.hash in again.message.refusal.reason
    actions = [e.action for e in site.store.audit_entries()]
    assert actions.count("script_received") == 2 and "script_approved" in actions
    site.close()


MANIFEST = (
    "name: NAME\nversion: '1'\nvariables: [chol]\nk: 1\nbound: {norm: l1, value: 1}\nmode: sdc\n"
)
ATTACKS = {
    "opens a socket": ("import socket\n", "network|import"),
    "reads a file": ("open('/etc/hostname').read()\n", "file"),
    "imports ctypes": ("import ctypes\n", "import"),
    "imports subprocess": ("import subprocess\n", "import"),
    "runs a shell": ("import os\nos.system('true')\n", "process"),
    "forks": ("import os\nos.fork()\n", "process"),
    "exceeds its memory": ("x = np.ones(1 << 29)\n", "memory"),
    "runs forever": ("while True:\n        pass\n", "cpu"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_the_sandbox_stops_each_attack_by_name_and_the_site_keeps_serving(
    attack, tmp_path, heart_frames, heart_dict, caplog
):
    body, category = ATTACKS[attack]
    module = (
        "import numpy as np\n\n\ndef per_record(frame):\n    "
        + body.replace("\n", "\n    ").rstrip()
        + "\n    return np.ones((len(frame), 1))\n\n\ndef combine(total, n):\n    return {'n': n}\n"
    )
    text = MANIFEST.replace("NAME", "attack")
    site = script_site(tmp_path, heart_frames["cleveland"], heart_dict)
    evil = ScriptBundle(module, text)
    site.handle(script_task(evil, "a0"))
    site.store.decide_script(evil.hash, True, "it.cleveland")
    with caplog.at_level("WARNING", logger="alliance.site"):
        outcome = site.handle(script_task(evil, "a1"))
    assert outcome.status == "refused" and outcome.message.refusal.code == "script"
    reason = outcome.message.refusal.reason
    assert reason.startswith("the sandbox stopped script 'attack' 1")
    assert any(f"({c})" in caplog.text for c in category.split("|")), caplog.text
    refused = [e for e in site.store.audit_entries() if e.action == "refused"]
    assert json.loads(refused[-1].detail)["reason"] == reason  # the audit log says why
    # The site keeps serving: an approved, well-behaved script runs next.
    good = bundle("odds_ratio")
    site.handle(script_task(good, "g0"))
    site.store.decide_script(good.hash, True, "it.cleveland")
    assert site.handle(script_task(good, "g1")).status == "reply"
    site.close()


def test_a_refusal_never_carries_what_the_script_raised_or_printed(
    tmp_path, heart_frames, heart_dict, caplog
):
    """A refusal oracle: a script that puts a patient's value in its error message. The value
    reaches the site's own log, never the refusal the coordinator sees."""
    module = (
        "def per_record(frame):\n    print(frame.chol.iloc[0])\n"
        "    raise ValueError(f'leak {float(frame.chol.iloc[0])!r}')\n\n\n"
        "def combine(total, n):\n    return {'n': n}\n"
    )
    text = MANIFEST.replace("NAME", "leak")
    site = script_site(tmp_path, heart_frames["cleveland"], heart_dict)
    evil = ScriptBundle(module, text)
    site.handle(script_task(evil, "l0"))
    site.store.decide_script(evil.hash, True, "it.cleveland")
    with caplog.at_level("WARNING", logger="alliance.site"):
        outcome = site.handle(script_task(evil, "l1"))
    value = repr(float(heart_frames["cleveland"].chol.dropna().iloc[0]))
    assert outcome.message.refusal.reason.endswith("it raised an error")
    assert value not in outcome.message.refusal.reason
    assert all(value not in e.detail for e in site.store.audit_entries())
    assert f"leak {value}" in caplog.text  # the site admin can still debug it
    site.close()


def test_a_malicious_unbounded_script_releases_only_clipped_noised_sums(
    tmp_path, heart_frames, heart_dict
):
    """per_record returns each patient's raw cholesterol, far above the declared bound of 1:
    the framework clips every record to 1, so the exact total is the record count, and dp adds
    Laplace noise scaled to that bound."""
    module = (
        "def per_record(frame):\n    return frame.chol.to_numpy()\n\n\n"
        "def combine(total, n):\n    return {'total': float(total[0])}\n"
    )
    text = (
        "name: raw\nversion: '1'\nvariables: [chol]\nk: 1\nbound: {norm: l1, value: 1}\nmode: dp\n"
    )
    from analyses import get_analysis
    from analyses.base import AnalysisContext

    evil = ScriptBundle(module, text)
    analysis = get_analysis("script")
    params = analysis.parse_params(
        {"hash": evil.hash, "module": evil.module, "manifest": evil.manifest_text}, heart_dict
    )
    frame = heart_frames["cleveland"]
    arrays = analysis.local(frame, params, AnalysisContext(heart_dict, "dp"))
    rows = frame.chol.notna().sum()
    assert arrays["total"][0] == pytest.approx(float(rows))  # each record clipped to 1
    assert frame.chol.dropna().sum() > 100 * rows  # what an unclipped sum would have been
    site = script_site(tmp_path, frame, heart_dict, mode="dp")
    site.handle(script_task(evil, "r0", mode="dp", epsilon=1.0))
    site.store.decide_script(evil.hash, True, "it.cleveland")
    reply = site.handle(script_task(evil, "r1", mode="dp", epsilon=1.0)).message.reply
    total = next(a for a in reply.record.arrays if a.name == "total")
    assert total.mechanism == "laplace" and 0 < total.scale <= 2.0 + 1e-9
    assert abs(total.values[0] - rows) < 60  # noise of scale <= 2, not a sum of cholesterol
    site.close()


@pytest.mark.parametrize(
    ("body", "category"),
    [
        ("import socket", "import"),
        ("open('/etc/hostname').read()", "file"),
        ("import os; os.fork()", "process"),
        ("return np.ones((len(frame), 1))", None),
    ],
)
def test_a_fresh_interpreter_isolates_as_the_fork_server_does(body, category):
    """The cold path (the fork server busy or unavailable) applies the same layers."""
    from analyses.sandbox import SandboxLimits, ScriptStopped, run_function

    source = f"import numpy as np\n\n\ndef per_record(frame):\n    {body}\n"
    frame = pd.DataFrame({"chol": [200.0, 250.0]})
    limits = SandboxLimits(cpu_seconds=2, memory_mb=256, wall_seconds=30)
    if category is None:
        run = run_function("cold", source, "per_record", limits, frame=frame, warm=False)
        assert run.value.shape == (2, 1)
        assert all(state.startswith("applied") for state in run.layers.values()), run.layers
        assert set(run.layers) == {
            "limits",
            "network namespace",
            "landlock",
            "seccomp",
            "audit hook",
        }
        return
    with pytest.raises(ScriptStopped) as caught:
        run_function("cold", source, "per_record", limits, frame=frame, warm=False)
    assert caught.value.category == category


KERNEL_PROBE = """
import errno
import os
import socket

import numpy as np


def attempt(action):
    try:
        action()
    except OSError as exc:
        return exc.errno
    return 0


def per_record(frame):
    def connect():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.connect(("127.0.0.1", 5432))

    def read():
        with open("/etc/hostname") as f:
            f.read()

    def fork():
        if os.fork() == 0:
            os._exit(0)

    def write():
        with open("/tmp/alliance-sandbox-escape", "w") as f:
            f.write("x")

    codes = [attempt(a) for a in (connect, read, fork, write)]
    return np.tile(np.array(codes, dtype=float), (len(frame), 1))
"""


@pytest.mark.parametrize("warm", [True, False])
def test_below_the_audit_hook_the_kernel_refuses_sockets_files_and_forks(warm):
    """With the audit hook left out (as if a script slipped past it), seccomp refuses the
    socket and the fork (EPERM) and Landlock the read and the write (EACCES): the script can
    only report the failures. On the old code (no kernel layers) each call succeeded."""
    import errno

    from analyses.sandbox import SandboxLimits, run_function

    run = run_function(
        "probe",
        KERNEL_PROBE,
        "per_record",
        SandboxLimits(),
        frame=pd.DataFrame({"a": [1.0]}),
        warm=warm,
        audit_hook=False,
    )
    connect, read, fork, write = run.value[0]
    assert connect == errno.EPERM and fork == errno.EPERM
    assert read == errno.EACCES and write == errno.EACCES
    assert not Path("/tmp/alliance-sandbox-escape").exists()


def test_the_audit_hook_stops_a_script_reaching_ctypes_through_numpy():
    """numpy holds a reference to ctypes; loading a library through it is an audit event."""
    from analyses.sandbox import SandboxLimits, run_function

    source = (
        "import numpy as np\n\n\ndef per_record(frame):\n"
        "    internal = np._core._internal if hasattr(np, '_core') else np.core._internal\n"
        "    ctypes = internal.ctypes\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    return np.ones((len(frame), 1))\n"
    )
    from analyses.sandbox import ScriptStopped

    with pytest.raises(ScriptStopped) as caught:  # the hook sees dlopen first
        run_function(
            "ctypes", source, "per_record", SandboxLimits(), frame=pd.DataFrame({"a": [1.0]})
        )
    assert caught.value.category == "process"


def test_a_large_site_gets_its_whole_contribution_array_back(heart_dict):
    """200,000 rows x 2 contributions (3.2 MB) come back whole: the output cap follows the
    declared shape (it was once a fixed 1 MB, which refused every site above 65,000 rows)."""
    from analyses import get_analysis
    from analyses.base import AnalysisContext

    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {"age": rng.uniform(20, 90, 200_000), "chol": rng.uniform(100, 400, 200_000)}
    )
    b = bundle("weighted_mean")
    analysis = get_analysis("script")
    params = analysis.parse_params(
        {"hash": b.hash, "module": b.module, "manifest": b.manifest_text}, heart_dict
    )
    arrays = analysis.local(frame, params, AnalysisContext(heart_dict, "sdc"))
    # Reference: numpy's sums of age * chol and of age.
    np.testing.assert_allclose(
        arrays["total"], [(frame.age * frame.chol).sum(), frame.age.sum()], rtol=1e-12
    )


# ----------------------------------------------------------------------------- L2: zCDP

L2_MANIFEST = (
    "name: age_l2\nversion: '1'\nvariables: [age]\nk: 2\nbound: {norm: l2, value: 130}\nmode: dp\n"
)
L2_MODULE = (
    "import numpy as np\n\n\ndef per_record(frame):\n"
    "    return np.column_stack([frame.age.to_numpy(), np.full(len(frame), 50.0)])\n\n\n"
    "def combine(total, n):\n    return {'mean': total[0] / n}\n"
)


def test_an_l2_bound_clips_to_the_euclidean_norm():
    m = ScriptManifest.model_validate(manifest(bound={"norm": "l2", "value": 5}))
    clipped, touched = clip_contributions(np.array([[3.0, 4.0], [6.0, 8.0]]), m, 2)
    np.testing.assert_allclose(clipped, [[3.0, 4.0], [3.0, 4.0]])
    assert touched == 1


def test_gaussian_noise_on_an_l2_total_matches_the_stated_sd_and_opendp_certifies_its_rho():
    """The site engine releases an L2 script's totals 500 times through OpenDP's Gaussian
    mechanism: observed over stated sd in 0.8 .. 1.25, and the rho OpenDP's zCDP map certifies
    adds up to at most the task's rho."""
    from analyses import get_analysis
    from analyses.base import AnalysisContext
    from protocol.config import DataDictionary, SDCThresholds
    from site_node.privacy import privatize

    heart = DataDictionary.model_validate(
        {"variables": {"age": {"type": "numeric", "min": 0, "max": 120}}}
    )
    b = ScriptBundle(L2_MODULE, L2_MANIFEST)
    analysis = get_analysis("script")
    params = analysis.parse_params(
        {"hash": b.hash, "module": b.module, "manifest": b.manifest_text}, heart
    )
    ctx = AnalysisContext(heart, "dp")
    spec = analysis.declare(params, ctx)
    arrays = {"total": np.array([5000.0, 4000.0]), "n": np.asarray(80.0)}
    noise, stated, rho = [], set(), set()
    for _ in range(500):
        record = privatize(spec, arrays, "dp", 0.0, SDCThresholds(), rho=0.5)
        noise.append(record["total"] - arrays["total"])
        stated.add(round(record.releases["total"].scale, 9))
        rho.add(sum(r.rho for r in record.releases.values()))
        assert record.releases["total"].mechanism == "gaussian" and record.epsilon == 0.0
    assert len(stated) == 1 and max(rho) <= 0.5
    ratio = np.std(np.array(noise), axis=0, ddof=1) / stated.pop()
    assert np.all((ratio > 0.8) & (ratio < 1.25)), ratio


def test_a_site_charges_an_l2_script_to_its_rho_budget_and_refuses_past_it(
    tmp_path, heart_frames, heart_dict
):
    policy = {
        "allowed_analyses": ["script"],
        "studies": [{"id": "s1", "mode": "dp", "budget": 1.0, "rho_budget": 0.5}],
    }
    site = make_site(tmp_path, heart_frames["cleveland"], heart_dict, policy)
    b = ScriptBundle(L2_MODULE, L2_MANIFEST)

    def l2_task(task_id: str, rho: float):
        wire = script_task(b, task_id, mode="dp")
        wire.rho = rho
        return wire

    site.handle(l2_task("z0", 0.3))
    site.store.decide_script(b.hash, True, "it")
    no_rho = site.handle(l2_task("z1", 0.0))
    assert no_rho.message.refusal.code == "validation"
    assert "needs a zCDP rho" in no_rho.message.refusal.reason
    first = site.handle(l2_task("z2", 0.3))
    assert first.status == "reply" and first.message.reply.rho_spent == 0.3
    assert first.message.reply.epsilon_spent == 0.0
    assert site.store.spent_rho("s1").rho == pytest.approx(0.3)
    assert site.store.spent("s1").epsilon == 0.0  # the epsilon budget is untouched
    second = site.handle(l2_task("z3", 0.3))
    assert second.message.refusal.code == "budget"
    assert "study s1 has rho 0.2 left at this site; this request needs 0.3 (short by 0.1)" in (
        second.message.refusal.reason
    )
    site.close()


def test_a_site_without_a_rho_budget_refuses_gaussian_releases(tmp_path, heart_frames, heart_dict):
    site = script_site(tmp_path, heart_frames["cleveland"], heart_dict, mode="dp")
    b = ScriptBundle(L2_MODULE, L2_MANIFEST)
    wire = script_task(b, "n0", mode="dp")
    wire.rho = 0.1
    site.handle(wire)
    site.store.decide_script(b.hash, True, "it")
    wire.task_id = "n1"
    refused = site.handle(wire)
    assert refused.message.refusal.code == "budget"
    assert "sets no rho_budget" in refused.message.refusal.reason
    assert site.store.spent_rho("s1").rho == 0.0
    site.close()


def test_a_zcdp_request_without_rho_is_refused_before_any_task(heart_dict):
    from analyses import get_analysis
    from analyses.driver import RoundDriver
    from protocol.budget import PureDP

    b = ScriptBundle(L2_MODULE, L2_MANIFEST)
    analysis = get_analysis("script")
    params = analysis.parse_params(
        {"hash": b.hash, "module": b.module, "manifest": b.manifest_text}, heart_dict
    )
    with pytest.raises(ValidationError, match="give `rho` in the request"):
        RoundDriver(analysis, params, heart_dict, "dp", ["a"], PureDP(0.5))


@pytest.mark.parametrize(
    ("state", "words"),
    [
        ({"state": {"beta": [0.0, float("nan")], "iteration": 0.0}}, "state"),
        ({"state": {"beta": [0.0] * 1001}}, "at most 1000 numbers"),
        ({"state": {"x" * 65: 1.0}}, "identifiers"),
        ({"state": {"beta": [0.0, 0.0]}, "memo": {"site_a": 1.0}}, "memo"),
    ],
)
def test_a_site_refuses_a_hostile_round_state_for_an_iterative_script(state, words, heart_dict):
    """The round state is the coordinator's choice: NaN, an oversized state, odd names or an
    undeclared key are refused before per_record runs."""
    from analyses import get_analysis
    from analyses.base import AnalysisContext

    b = bundle("logistic_newton")
    analysis = get_analysis("script")
    params = analysis.parse_params(
        {"hash": b.hash, "module": b.module, "manifest": b.manifest_text}, heart_dict
    )
    ctx = AnalysisContext(heart_dict, "sdc", round=1)
    with pytest.raises(ValidationError) as caught:
        analysis.parse_state(state, params, ctx)
    assert words in str(caught.value)


def test_an_iterative_script_cannot_run_past_its_declared_rounds(heart_frames, heart_dict):
    module = (
        "import numpy as np\n\n\ndef per_record(frame, state):\n"
        "    return np.ones((len(frame), 1))\n\n\n"
        "def combine(total, n, state):\n    return {'state': {'again': 1.0}}\n"
    )
    text = (
        "name: forever\nversion: '1'\nvariables: [age]\nk: 1\nbound: {norm: l1, value: 1}\n"
        "mode: sdc\nrounds: 3\n"
    )
    from analyses.testing import federate

    b = ScriptBundle(module, text)
    with pytest.raises(ValidationError, match="asked for round 4, but its manifest declares"):
        federate(
            "script",
            {"a": heart_frames["cleveland"]},
            {"hash": b.hash, "module": b.module, "manifest": b.manifest_text},
            heart_dict,
        )


def test_an_offered_script_waits_for_review_and_a_malformed_offer_is_dropped(
    tmp_path, heart_frames, heart_dict, caplog
):
    from protocol.wire import alliance_pb2 as pb

    site = script_site(tmp_path, heart_frames["cleveland"], heart_dict)
    good = bundle("odds_ratio")
    offer = pb.ScriptOffer(study_id="s1", module=good.module, manifest=good.manifest_text)
    site.receive_offer(offer)
    site.receive_offer(offer)  # offered again on a reconnect: kept and audited once
    assert site.store.script_status(good.hash) == "pending"
    assert [e.action for e in site.store.audit_entries()].count("script_received") == 1
    with caplog.at_level("WARNING", logger="alliance.site"):
        site.receive_offer(pb.ScriptOffer(study_id="s1", module="x", manifest="k: [unclosed"))
    assert "dropped a script offered for study s1" in caplog.text
    assert len(site.store.scripts()) == 1
    # Offered is not approved: a task that names it is still refused.
    refused = site.handle(script_task(good, "o1"))
    assert refused.message.refusal.code == "script"
    site.close()
