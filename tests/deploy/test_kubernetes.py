"""deploy/kubernetes/: the kustomize base and overlays, checked offline (no cluster here).

`kubectl kustomize` renders each; every rendered object validates with kubernetes-validate in
strict mode (unknown fields refused) against the oldest Kubernetes the manifests support and
the newest the package knows. Then the rendered Job's own command and environment run as three
workers under three host names, as three pods would, against a real PostgreSQL and a real
`mlflow server`: one is killed with SIGKILL mid-trial while the others wait with nothing left
to claim; they take its point over, finish the grid, and exit 0 only then.
"""

from __future__ import annotations

import collections
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO, clean_env, load_optuna_study, other_host_command, write_config
from servers import PG_PASSWORD, missing_tool

KUBERNETES = REPO / "deploy" / "kubernetes"
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/gpu", "overlays/dev"]
# podFailurePolicy (a preempted pod costs no retry, bad input fails the Job) is stable from 1.31
OLDEST_KUBERNETES = "1.31"
SECRET = "fractal-study-stores"
SECRET_KEYS = {"FRACTAL_STORAGE", "MLFLOW_TRACKING_URI", "PGPASSWORD"}


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        missing_tool("kubectl is not installed (`kubectl kustomize` renders deploy/kubernetes)")
    return found


def kubernetes_validate():
    try:
        from kubernetes_validate import utils
    except ImportError:
        missing_tool("kubernetes-validate is not installed (pip install -e '.[dev]')")
    return utils


@functools.cache
def _rendered(name: str) -> str:
    proc = subprocess.run([kubectl(), "kustomize", str(KUBERNETES / name)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def render(name: str) -> list[dict]:
    """The objects `kubectl kustomize deploy/kubernetes/<name>` renders (fresh copies)."""
    return [obj for obj in yaml.safe_load_all(_rendered(name)) if obj]


def job(objects: list[dict]) -> dict:
    [found] = [o for o in objects if o["kind"] == "Job"]
    return found


def container(job: dict, name: str = "worker") -> dict:
    [found] = [c for c in job["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def volumes(job: dict) -> dict[str, dict]:
    return {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}


def config_maps(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}


def mounted_files(objects: list[dict], pod_container: dict, pod_job: dict) -> dict[str, str]:
    """{path in the container: text} for every ConfigMap the container mounts."""
    maps, vols = config_maps(objects), volumes(pod_job)
    files = {}
    for mount in pod_container.get("volumeMounts", []):
        source = vols[mount["name"]].get("configMap")
        if source:
            for key, text in maps[source["name"]]["data"].items():
                files[f"{mount['mountPath']}/{key}"] = text
    return files


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# -- rendering and schemas ---------------------------------------------------------------------

@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kustomize_renders_the_base_and_every_overlay(name):
    kinds = collections.Counter(o["kind"] for o in render(name))
    assert kinds["Job"] == 1 and kinds["ConfigMap"] >= 1
    if name == "overlays/dev":  # self-contained: it runs both servers too
        assert kinds["Deployment"] == 2 and kinds["Service"] == 2
    else:  # the others expect existing ones
        assert "Deployment" not in kinds


@pytest.mark.parametrize("version", ["oldest", "newest"])
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_rendered_object_validates_strictly(name, version):
    utils = kubernetes_validate()
    target = OLDEST_KUBERNETES if version == "oldest" else utils.latest_version()
    errors = []
    for obj in render(name):
        try:
            checked = utils.validate(obj, target, strict=True)
        except (utils.ValidationError, utils.SchemaNotFoundError) as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc}")
        else:
            assert checked == utils.major_minor(target)
    assert not errors, "\n".join(errors)


def test_strict_validation_refuses_an_unknown_field():
    """The check above would pass on anything if strict mode let misspelled fields through."""
    utils = kubernetes_validate()
    broken = job(render("base"))
    container(broken)["gpus"] = 1  # not a field of a Container
    with pytest.raises(utils.ValidationError):
        utils.validate(broken, OLDEST_KUBERNETES, strict=True)


# -- what the Job says -----------------------------------------------------------------------

@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_job_is_a_work_queue_of_study_workers(name, tmp_path):
    from fractal_mlops.config.experiment import load_config
    from fractal_mlops.errors import EXIT_BAD_INPUT
    from fractal_mlops.search.launcher import GRACE_SECONDS

    objects = render(name)
    study_job = job(objects)
    spec, pod = study_job["spec"], study_job["spec"]["template"]["spec"]
    assert study_job["apiVersion"] == "batch/v1"
    assert spec["parallelism"] >= 1 and "completions" not in spec  # the work-queue pattern
    assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] >= 1
    assert spec["ttlSecondsAfterFinished"] > 0
    assert pod["terminationGracePeriodSeconds"] >= GRACE_SECONDS
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "worker", "operator": "In",
                                                 "values": [EXIT_BAD_INPUT]}} in rules
    assert {"action": "Ignore", "onPodConditions": [
        {"type": "DisruptionTarget", "status": "True"}]} in rules

    worker = container(study_job)
    assert worker["image"].rsplit("/", 1)[-1].startswith("fractal-mlops-worker:")
    assert worker["command"] == ["python", "-m", "fractal_mlops.study"]
    assert {"name": SECRET} == worker["envFrom"][0]["secretRef"]
    assert worker["resources"]["requests"]["cpu"] and worker["resources"]["limits"]["memory"]
    mounts = {m["mountPath"]: m for m in worker["volumeMounts"]}
    vols = volumes(study_job)
    assert vols[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"

    # --config names an experiment file from experiments/, mounted from the ConfigMap
    files = mounted_files(objects, worker, study_job)
    config_path = flag(worker["args"], "--config")
    assert files[config_path] == (REPO / "experiments" / Path(config_path).name).read_text()
    (tmp_path / "study.yaml").write_text(files[config_path])
    config = load_config(str(tmp_path / "study.yaml"))
    if config.data.root is not None:  # the image's working directory is /app
        root = os.path.normpath(f"/app/{config.data.root}")
        assert root in mounts and mounts[root]["readOnly"], (root, sorted(mounts))
        data = vols[mounts[root]["name"]]["persistentVolumeClaim"]
        assert data["readOnly"] is True
    if name == "overlays/gpu":
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert flag(worker["args"], "--device") == "cuda"


def test_no_credential_is_written_in_the_manifests_or_their_examples():
    for name in KUSTOMIZATIONS:
        for obj in render(name):
            assert obj["kind"] != "Secret", f"{name}: a Secret belongs in the user's env file"
            text = yaml.safe_dump(obj)
            assert "://fractal:" not in text  # no user:password@ in a URL
            pod = obj.get("spec", {}).get("template", {}).get("spec", {})
            for item in [c for key in ("containers", "initContainers") for c in pod.get(key, [])]:
                for var in item.get("env", []):
                    if "PASSWORD" in var["name"] or "TOKEN" in var["name"]:
                        assert var["valueFrom"]["secretKeyRef"]["name"] == SECRET, var
    examples = sorted(KUBERNETES.rglob("stores.env.example"))
    assert len(examples) == 2
    for example in examples:
        values = dict(line.split("=", 1) for line in example.read_text().splitlines()
                      if line and not line.startswith("#"))
        assert set(values) <= SECRET_KEYS and values.get("PGPASSWORD", "") == ""
        assert all("@" not in v or "://fractal@" in v for v in values.values())
        ignored = subprocess.run(["git", "check-ignore", "-q", str(example.with_suffix(""))],
                                 cwd=REPO)
        assert ignored.returncode == 0, f"git would commit {example.with_suffix('')}"


# -- the rendered Job, run as three workers ------------------------------------------------------

def pod_environment(pod_container: dict, secret: dict[str, str]) -> dict[str, str]:
    """The variables Kubernetes gives the container: its Secret's keys, its literal values and
    its resource fields (the image's own, PATH and the like, come from this process)."""
    env: dict[str, str] = {}
    for source in pod_container.get("envFrom", []):
        assert source["secretRef"]["name"] == SECRET
        env.update(secret)
    requests = pod_container.get("resources", {}).get("requests", {})
    for var in pod_container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "resourceFieldRef" in var["valueFrom"]:
            field = var["valueFrom"]["resourceFieldRef"]["resource"]
            assert field == "requests.cpu", field
            env[var["name"]] = str(max(1, int(float(requests["cpu"].rstrip("m")) /
                                              (1000 if requests["cpu"].endswith("m") else 1))))
        else:
            env[var["name"]] = secret[var["valueFrom"]["secretKeyRef"]["key"]]
    return env


def _output(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.mark.slow
def test_the_rendered_job_runs_as_workers_that_end_only_with_the_grid(
        tmp_path, postgres, mlflow_server_on_postgres):
    from mlflow import MlflowClient

    from fractal_mlops.config.experiment import load_config
    from fractal_mlops.config.space import grid

    objects = render("overlays/dev")
    study_job = job(objects)
    worker = container(study_job)
    [waiter] = study_job["spec"]["template"]["spec"]["initContainers"]
    secret = {"FRACTAL_STORAGE": f"postgresql://{postgres.user}@{postgres.host}:{postgres.port}/optuna",
              "MLFLOW_TRACKING_URI": mlflow_server_on_postgres.uri, "PGPASSWORD": PG_PASSWORD}
    base_env = {k: v for k, v in clean_env().items() if not k.startswith(("MLFLOW_", "FRACTAL_"))}

    # The ConfigMap's files where the pod mounts them (under tmp_path); the experiment file the
    # Job names holds a two-point grid instead: a slow point (4 columns) first, then a fast one.
    files = mounted_files(objects, worker, study_job)
    config_path = flag(worker["args"], "--config")
    for path, text in files.items():
        (tmp_path / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path.lstrip("/")).write_text(text)
    write_config(tmp_path / config_path.lstrip("/"), study_name="k8s-workers",
                 space={"blocks": [1], "columns": [4, 1], "width": [32], "unit": ["conv-norm-act"]},
                 training={"epochs": 24})
    args = [str(tmp_path / a.lstrip("/")) if a in files else a for a in worker["args"]]
    argv = [sys.executable if worker["command"][0] == "python" else worker["command"][0],
            *worker["command"][1:], *args]

    # the init container: waits for the tracking server, which answers
    waited = subprocess.run([sys.executable, *waiter["command"][1:]], capture_output=True,
                            text=True, timeout=60, env={**base_env, **pod_environment(waiter, secret)})
    assert waited.returncode == 0, waited.stdout + waited.stderr

    pods = []
    for index in range(3):
        home = tmp_path / f"pod-{index}"
        home.mkdir()
        env = {**base_env, **pod_environment(worker, secret), "HOME": str(home),
               "FRACTAL_MLOPS_CACHE": str(home / "cache"),
               # a lost pod is noticed after 10 s instead of 60 s (shorter graces take live
               # workers for lost on a busy 2-core machine)
               "FRACTAL_HEARTBEAT_SECONDS": "1", "FRACTAL_HEARTBEAT_GRACE": "10"}
        assert env["FRACTAL_THREADS"] == "1"  # from the pod's CPU request
        with open(home / "out", "w") as out, open(home / "err", "w") as err:
            pods.append(subprocess.Popen([*other_host_command(f"pod-{index}"), *argv], cwd=home,
                                         env=env, stdout=out, stderr=err))
    study = None
    try:
        # The slow point's pod has trained an epoch, and both others wait with nothing to claim.
        deadline = time.monotonic() + 300
        victim = None
        while victim is None:
            assert time.monotonic() < deadline, [_output(tmp_path / f"pod-{i}" / "err") for i in range(3)]
            for index, pod in enumerate(pods):
                assert pod.poll() is None, _output(tmp_path / f"pod-{index}" / "err")
            time.sleep(0.5)
            if study is None:
                try:
                    study = load_optuna_study(postgres.optuna_url, "k8s-workers")
                except KeyError:
                    continue
            slow = [t for t in study.get_trials(deepcopy=False)
                    if t.params.get("variant", "").startswith("b1-c4") and t.intermediate_values]
            if not slow:
                continue
            [trial] = slow
            assert trial.state.name == "RUNNING", "the slow point ended before the others waited"
            owner = int(trial.user_attrs["worker"].split(":")[0].removeprefix("pod-"))
            others = [i for i in range(3) if i != owner]
            if all("no grid point left to claim" in _output(tmp_path / f"pod-{i}" / "out")
                   for i in others):
                victim = owner
        pods[victim].send_signal(signal.SIGKILL)
        ended: dict[int, float] = {}
        deadline = time.monotonic() + 400
        while len(ended) < 3 and time.monotonic() < deadline:
            for index, pod in enumerate(pods):
                if index not in ended and pod.poll() is not None:
                    ended[index] = time.time()
            time.sleep(0.1)
    finally:
        for pod in pods:
            if pod.poll() is None:
                pod.kill()
                pod.wait()

    outputs = {i: _output(tmp_path / f"pod-{i}" / "out") + _output(tmp_path / f"pod-{i}" / "err")
               for i in range(3)}
    survivors = [i for i in range(3) if i != victim]
    assert pods[victim].returncode == -signal.SIGKILL
    for index in survivors:
        assert pods[index].returncode == 0, outputs[index]
        assert PG_PASSWORD not in outputs[index]

    trials = study.get_trials()
    final = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    points = [v.name for v in grid(load_config(str(tmp_path / config_path.lstrip("/"))))]
    assert len(points) == 2  # every point once
    assert collections.Counter(t.params["variant"] for t in final) == dict.fromkeys(points, 1), trials
    [lost] = [t for t in trials if t.state.name == "FAIL"]
    assert lost.user_attrs["reason"] == "worker lost" and lost.user_attrs["worker"].startswith(
        f"pod-{victim}:")
    [successor] = [t for t in final if t.params["variant"] == lost.params["variant"]]
    assert successor.user_attrs["mlflow_run_id"] == lost.user_attrs["mlflow_run_id"]  # continued
    assert successor.user_attrs["worker"].split(":")[0] in {f"pod-{i}" for i in survivors}
    grid_done_at = max(t.datetime_complete.timestamp() for t in final)
    for index in survivors:  # each waited, and ended only once the grid was done
        assert ended[index] >= grid_done_at, (index, ended[index], grid_done_at)

    # exactly one of them wrote the study report, onto the study run
    wrote = [i for i in survivors if "report: on the study run" in outputs[i]]
    assert len(wrote) == 1, outputs
    assert "writes the study report" in " ".join(outputs[[i for i in survivors if i not in wrote][0]]
                                                  .split())
    client = MlflowClient(mlflow_server_on_postgres.uri)
    experiment = client.get_experiment_by_name("k8s-workers")
    runs = client.search_runs([experiment.experiment_id])
    [study_run] = [r for r in runs if r.data.tags["fractal.role"] == "study"]
    assert "report/report.html" in {a.path for a in client.list_artifacts(study_run.info.run_id,
                                                                          "report")}
    assert "RUNNING" not in {r.info.status for r in runs}
