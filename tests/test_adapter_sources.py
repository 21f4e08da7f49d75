"""Adapter sources confined by `AdapterSourcePolicy`, and adapter weights read safely: no path escapes from the adapter
roots or the S3 cache, size caps before downloading, allow-listed buckets and Hub organisations, no pickle code run,
no inf/nan weights. Built on hand-written tiny adapters (no model needed), moto's S3 server and the Hub stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import huggingface_hub.constants
import pytest
import torch
from hub_server import HubServer
from moto.server import ThreadedMotoServer
from safetensors.torch import save_file
from server_process import free_port

from loraserve.adapters.merge import MergeSpec, merge_adapters
from loraserve.adapters.peft import load_peft_adapter
from loraserve.adapters.sources import AdapterSourcePolicy, cached_on_disk, check_hub_access, resolve_adapter
from loraserve.errors import AdapterLoadError, AdapterNotFound, InvalidRequest

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
PROJECTIONS = {Q: (16, 16), V: (16, 8)}
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (d_in, d_out) in PROJECTIONS.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(2, d_in, generator=generator)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(d_out, 2, generator=generator)
    return tensors


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor] | None = None, pickle: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    tensors = _tensors() if tensors is None else tensors
    if pickle:
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def load(folder: Path, **options: object):
    return load_peft_adapter(folder, "x", PROJECTIONS, torch.float32, **options)


# --- local adapters inside the roots -------------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path) -> tuple[AdapterSourcePolicy, Path, Path]:
    """A policy with one adapter root holding `team/good`, and a folder outside it holding a valid adapter too."""
    root = tmp_path / "root"
    write_adapter(root / "team" / "good")
    outside = write_adapter(tmp_path / "outside" / "secret")
    return AdapterSourcePolicy(adapter_roots=(root,)), root, outside


def _refusal(adapter_id: str, policy: AdapterSourcePolicy, cache: Path) -> str:
    with pytest.raises(AdapterNotFound) as caught:
        resolve_adapter(adapter_id, "local", None, cache, policy=policy)
    return str(caught.value).replace(repr(adapter_id), "<id>")


def test_local_ids_resolve_inside_the_roots(roots, tmp_path: Path) -> None:
    policy, root, _ = roots
    assert resolve_adapter("team/good", "local", None, tmp_path, policy=policy) == (root / "team/good").resolve()
    absolute = str((root / "team" / "good").resolve())
    assert resolve_adapter(absolute, "local", None, tmp_path, policy=policy) == Path(absolute)
    second = AdapterSourcePolicy(adapter_roots=(tmp_path / "missing-root", root))  # the first root that holds it
    assert resolve_adapter("team/good", "local", None, tmp_path, policy=second) == (root / "team/good").resolve()
    assert len(load(resolve_adapter("team/good", "local", None, tmp_path, policy=policy)).modules) == 2


def test_escapes_from_the_roots_get_one_message_whether_the_target_exists_or_not(roots, tmp_path: Path) -> None:
    """`..`, a symlink out, an absolute path elsewhere: refused alike for a real adapter folder outside and for a
    folder that does not exist, and the message never names a server path."""
    policy, root, outside = roots
    (root / "team" / "link-out").symlink_to(outside, target_is_directory=True)
    (root / "team" / "link-nowhere").symlink_to(tmp_path / "outside" / "nothing", target_is_directory=True)
    escapes = {
        "dotdot-existing": "../outside/secret",
        "dotdot-missing": "../outside/nothing",
        "nested-dotdot": "team/good/../../../outside/secret",
        "symlink-existing": "team/link-out",
        "symlink-missing": "team/link-nowhere",
        "absolute-existing": str(outside),
        "absolute-missing": str(tmp_path / "outside" / "nothing"),
        "missing-inside": "team/nothing",
        "home": "~",
        "empty": "",
    }
    messages = {name: _refusal(adapter_id, policy, tmp_path) for name, adapter_id in escapes.items()}
    assert len(set(messages.values())) == 1, messages
    message = next(iter(messages.values()))
    assert str(tmp_path) not in message and "outside" not in message
    # without roots (a private server) the same folder outside is served, as before
    assert resolve_adapter(str(outside), "local", None, tmp_path) == outside


def test_an_adapter_file_symlinked_out_of_the_roots_is_refused(roots, tmp_path: Path) -> None:
    """A chat template (or weights file) linked to a file outside would let a request read any server file."""
    policy, root, _ = roots
    secret = tmp_path / "outside" / "passwd"
    secret.write_text("root:x:0:0")
    sneaky = write_adapter(root / "team" / "sneaky")
    (sneaky / "chat_template.jinja").symlink_to(secret)
    message = _refusal("team/sneaky", policy, tmp_path)
    assert message == _refusal("team/nothing", policy, tmp_path)


# --- weights: pickle and finiteness --------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this calls `open(marker, "w")`: a stand-in for arbitrary code in a malicious adapter_model.bin."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return open, (str(self.marker), "w")


def _malicious_adapter(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    torch.save({**_tensors(), "payload": _Exploit(marker)}, folder / "adapter_model.bin")
    return folder


def test_a_pickle_that_runs_code_is_never_unpickled(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    torch.load(_malicious_adapter(tmp_path / "proof", canary) / "adapter_model.bin", weights_only=False)
    assert canary.exists()  # the payload really runs code when unpickled the unsafe way

    marker = tmp_path / "pwned"
    folder = _malicious_adapter(tmp_path / "evil", marker)
    with pytest.raises(AdapterLoadError, match="--allow-pickle-adapters"):
        load(folder)  # without the flag: not even opened
    with pytest.raises(AdapterLoadError, match="cannot read its weights"):
        load(folder, allow_pickle=True)  # with it: weights_only refuses the payload
    assert not marker.exists()


def test_a_plain_pickled_state_dict_loads_only_with_allow_pickle(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "bin", pickle=True)
    with pytest.raises(AdapterLoadError, match="--allow-pickle-adapters"):
        load(folder)
    pickled = load(folder, allow_pickle=True)
    plain = load(write_adapter(tmp_path / "st"))
    for name, module in plain.modules.items():
        torch.testing.assert_close(pickled.modules[name].b, module.b)


@pytest.mark.parametrize("part, value", [("lora_B", float("inf")), ("lora_A", float("nan")),
                                         ("lora_B", float("-inf"))])
def test_non_finite_weights_name_the_module(tmp_path: Path, part: str, value: float) -> None:
    tensors = _tensors()
    tensors[f"base_model.model.{Q}.{part}.weight"][0, 1] = value
    with pytest.raises(AdapterLoadError, match=rf"adapter 'x': {part} of {Q} holds inf/nan"):
        load(write_adapter(tmp_path / "bad", tensors))


def test_weights_that_overflow_once_scaled_are_refused(tmp_path: Path) -> None:
    tensors = _tensors()
    tensors[f"base_model.model.{V}.lora_B.weight"][0, 0] = 60000.0  # finite in float16, not once scaled by 2
    folder = write_adapter(tmp_path / "big", tensors)
    with pytest.raises(AdapterLoadError, match=f"{V} overflows float16"):
        load_peft_adapter(folder, "x", PROJECTIONS, torch.float16)
    assert load(folder).modules[V].b.isfinite().all()


def test_weights_over_the_size_cap_are_refused(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "a")
    with pytest.raises(AdapterLoadError, match="over this server's limit of 300 bytes"):
        load(folder, max_bytes=300)  # 448 bytes of float32 weights
    assert load(folder, max_bytes=10_000).modules


def test_missing_files_do_not_name_the_server_folder(tmp_path: Path) -> None:
    empty = tmp_path / "server-secret-folder"
    empty.mkdir()
    with pytest.raises(AdapterNotFound) as caught:
        load(empty)
    assert "server-secret-folder" not in str(caught.value)
    (empty / "adapter_config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(AdapterNotFound) as caught:
        load(empty)
    assert "server-secret-folder" not in str(caught.value)


# --- S3 ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory):
    mp = pytest.MonkeyPatch()
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(name, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="adapters")
    s3.create_bucket(Bucket="other")
    good = write_adapter(tmp_path_factory.mktemp("s3-src") / "good")
    for bucket in ("adapters", "other"):
        for file in good.iterdir():
            s3.upload_file(str(file), bucket, f"team/good/{file.name}")
    s3.put_object(Bucket="adapters", Key="team/good/optimizer.pt", Body=b"x" * 5000)  # not an adapter file
    s3.put_object(Bucket="adapters", Key="team/good/checkpoint-1/adapter_config.json", Body=b"{}")
    for file in good.iterdir():
        s3.upload_file(str(file), "adapters", f"team/evil/{file.name}")
    s3.put_object(Bucket="adapters", Key="team/evil/../../../escaped.json", Body=b"{}")
    for file in good.iterdir():
        s3.upload_file(str(file), "adapters", f"team/evil-backslash/{file.name}")
    s3.put_object(Bucket="adapters", Key="team/evil-backslash/..\\..\\escaped.json", Body=b"{}")
    for file in good.iterdir():
        s3.upload_file(str(file), "adapters", f"team/evil-absolute/{file.name}")
    s3.put_object(Bucket="adapters", Key="team/evil-absolute//tmp/escaped.json", Body=b"{}")
    yield endpoint, s3
    server.stop()
    mp.undo()


def test_an_s3_adapter_downloads_only_its_files_and_lands_whole(s3_endpoint, tmp_path: Path) -> None:
    endpoint, _ = s3_endpoint
    path = resolve_adapter("s3://adapters/team/good", "s3", None, tmp_path, endpoint)
    assert path == tmp_path / "s3" / "adapters" / "team" / "good"
    assert sorted(f.name for f in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert load(path).modules
    again = resolve_adapter("s3://adapters/team/good", "s3", None, tmp_path, endpoint)  # replaced in place
    assert again == path and sorted(f.name for f in path.iterdir()) == ["adapter_config.json",
                                                                           "adapter_model.safetensors"]
    assert [(s, i) for s, i, _ in cached_on_disk(tmp_path)] == [("s3", "s3://adapters/team/good")]
    assert not list((tmp_path / "s3" / ".partial").iterdir())  # no download left half-way


@pytest.mark.parametrize("prefix", ["team/evil", "team/evil-backslash", "team/evil-absolute"])
def test_s3_keys_that_would_leave_the_adapter_folder_are_refused(s3_endpoint, tmp_path: Path, prefix: str) -> None:
    endpoint, s3 = s3_endpoint
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket="adapters", Prefix=prefix + "/")["Contents"]]
    assert any(".." in key or "//" in key for key in keys), keys  # the store kept the hostile key as written
    with pytest.raises(AdapterLoadError, match="outside the adapter's folder"):
        resolve_adapter(f"s3://adapters/{prefix}", "s3", None, tmp_path / "cache", endpoint)
    assert not list(tmp_path.rglob("escaped.json"))
    assert not list(Path("/tmp").glob("escaped.json"))
    assert not (tmp_path / "cache" / "s3" / "adapters" / prefix).exists()


@pytest.mark.parametrize("adapter_id", ["s3://adapters/../x", "s3://adapters/team/../../x", "s3://../team/good",
                                        "s3://adapters/team//good", "s3://adapters/team\\..\\good"])
def test_s3_ids_that_would_leave_the_cache_are_refused(s3_endpoint, tmp_path: Path, adapter_id: str) -> None:
    endpoint, _ = s3_endpoint
    with pytest.raises(ValueError, match="not a usable S3 bucket and prefix"):  # InvalidRequest
        resolve_adapter(adapter_id, "s3", None, tmp_path / "cache", endpoint)
    assert not tmp_path.joinpath("cache").exists()


def test_an_s3_prefix_over_the_size_cap_is_refused_before_downloading(s3_endpoint, tmp_path: Path) -> None:
    endpoint, _ = s3_endpoint
    small = AdapterSourcePolicy(max_adapter_bytes=500)
    with pytest.raises(AdapterLoadError, match="over this server's limit of 500 bytes"):
        resolve_adapter("s3://adapters/team/good", "s3", None, tmp_path, endpoint, policy=small)
    assert not [f for f in tmp_path.rglob("*") if f.is_file()]  # nothing was downloaded
    # the 5000-byte optimizer.pt under the prefix is not an adapter file: it does not count
    assert resolve_adapter("s3://adapters/team/good", "s3", None, tmp_path, endpoint,
                           policy=AdapterSourcePolicy(max_adapter_bytes=3000)).is_dir()


def test_a_bucket_outside_the_allow_list_is_not_found(s3_endpoint, tmp_path: Path) -> None:
    endpoint, _ = s3_endpoint
    policy = AdapterSourcePolicy(allowed_s3_buckets=("adapters",))
    with pytest.raises(AdapterNotFound, match="bucket 'other'"):
        resolve_adapter("s3://other/team/good", "s3", None, tmp_path, endpoint, policy=policy)
    assert not tmp_path.joinpath("s3").exists()
    assert resolve_adapter("s3://adapters/team/good", "s3", None, tmp_path, endpoint, policy=policy).is_dir()


def test_a_pickle_only_s3_adapter_is_not_downloaded_without_the_flag(s3_endpoint, tmp_path: Path) -> None:
    endpoint, s3 = s3_endpoint
    for file in write_adapter(tmp_path / "src", pickle=True).iterdir():
        s3.upload_file(str(file), "adapters", f"team/pickled/{file.name}")
    with pytest.raises(AdapterLoadError, match="--allow-pickle-adapters"):
        resolve_adapter("s3://adapters/team/pickled", "s3", None, tmp_path / "cache", endpoint)
    assert not (tmp_path / "cache" / "s3" / "adapters").exists()
    path = resolve_adapter("s3://adapters/team/pickled", "s3", None, tmp_path / "cache", endpoint,
                           policy=AdapterSourcePolicy(allow_pickle=True))
    assert load(path, allow_pickle=True).modules


# --- Hub -----------------------------------------------------------------------------------------------------------


def _use_hub(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point huggingface_hub at the stand-in in this process (HF_ENDPOINT is read at import)."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True, raising=False)


def test_hub_orgs_are_allow_listed_and_errors_hide_the_hub_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    adapter = write_adapter(tmp_path / "adapter")
    with HubServer() as hub:
        _use_hub(hub, monkeypatch)
        hub.add_repo("acme/lora", adapter)
        hub.add_repo("evil/lora", adapter)
        policy = AdapterSourcePolicy(allowed_hub_orgs=("ACME",))
        path = resolve_adapter("acme/lora", "hub", None, tmp_path / "cache", policy=policy)
        assert load(path).modules
        requests = len(hub.requests)
        for repo in ("evil/lora", "no-org-repo"):
            with pytest.raises(AdapterNotFound, match="only from the organisations ACME"):
                resolve_adapter(repo, "hub", None, tmp_path / "cache", policy=policy)
            with pytest.raises(AdapterNotFound, match="only from the organisations ACME"):
                check_hub_access(repo, None, policy=policy)
        assert len(hub.requests) == requests  # refused without asking the Hub
        with pytest.raises(AdapterNotFound) as caught:
            resolve_adapter("acme/missing", "hub", None, tmp_path / "cache", policy=policy)
        message = str(caught.value)
        assert "acme/missing" in message and hub.url not in message and "127.0.0.1" not in message
        with pytest.raises(AdapterNotFound) as caught:
            check_hub_access("acme/missing", None)
        assert hub.url not in str(caught.value)


def test_a_pickle_only_hub_adapter_is_refused_before_downloading(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer() as hub:
        _use_hub(hub, monkeypatch)
        hub.add_repo("acme/pickled", write_adapter(tmp_path / "pickled", pickle=True))
        with pytest.raises(AdapterLoadError, match="--allow-pickle-adapters"):
            resolve_adapter("acme/pickled", "hub", None, tmp_path / "cache")
        assert not any("/resolve/" in path for _, path, _ in hub.requests)
        path = resolve_adapter("acme/pickled", "hub", None, tmp_path / "cache",
                               policy=AdapterSourcePolicy(allow_pickle=True))
        assert load(path, allow_pickle=True).modules


# --- merges ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    (MergeSpec(("a", "b"), (1.0, float("inf"))), r"\|w\| <= 100"),
    (MergeSpec(("a", "b"), (float("nan"), 1.0)), r"\|w\| <= 100"),
    (MergeSpec(("a", "b"), (1.0, -100.5)), r"\|w\| <= 100"),
    (MergeSpec(("a",), (True,)), "finite numbers"),
    (MergeSpec(("a",), ("1",)), "finite numbers"),
    (MergeSpec(("a", "b"), (1.0, 1.0), "ties", density=float("nan")), "density"),
    (MergeSpec(("a", "b"), (1.0, 1.0), "ties", density=1.5), "density"),
    (MergeSpec(tuple(f"a{i}" for i in range(33)), (1.0,) * 33), "at most 32"),
    (MergeSpec(("a", ""), (1.0, 1.0)), "non-empty strings"),
])
def test_merge_specs_with_unusable_numbers_are_refused(spec: MergeSpec, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        spec.validate()


def test_merge_limits_accept_the_bounds() -> None:
    MergeSpec(tuple(f"a{i}" for i in range(32)), (100.0, -100.0) * 16, "dare_ties", density=1.0).validate()
    with pytest.raises(InvalidRequest, match="at most 4"):
        MergeSpec(tuple(f"a{i}" for i in range(5)), (1.0,) * 5).validate(max_adapters=4)


def test_a_merge_that_overflows_is_refused_and_a_zero_alpha_part_adds_nothing(tmp_path: Path) -> None:
    tensors = _tensors()
    tensors[f"base_model.model.{Q}.lora_B.weight"][0, 0] = 30000.0
    big = load_peft_adapter(write_adapter(tmp_path / "big", tensors), "big", PROJECTIONS, torch.float16)
    with pytest.raises(InvalidRequest, match=f"merged lora_B of {Q} holds inf/nan"):
        merge_adapters([big, big], MergeSpec(("big", "big"), (100.0, 100.0)))
    plain = load(write_adapter(tmp_path / "plain"))
    zero_folder = write_adapter(tmp_path / "zero", _tensors(1))
    (zero_folder / "adapter_config.json").write_text(json.dumps({**CONFIG, "lora_alpha": 0}))
    zero = load(zero_folder)
    alone = merge_adapters([plain], MergeSpec(("plain",), (0.5,)))
    both = merge_adapters([plain, zero], MergeSpec(("plain", "zero"), (0.5, 0.9)))
    for name, module in alone.modules.items():
        assert both.modules[name].b.isfinite().all()
        # the zero-alpha part's A rows carry a zero B: the product B A is the plain adapter's alone
        torch.testing.assert_close(both.modules[name].b @ both.modules[name].a, module.b @ module.a)
