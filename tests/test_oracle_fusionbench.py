"""FusionBench (PyPI `fusion-bench` 0.2.33, the peer benchmark) as a test oracle for catmerge's merges.

FusionBench is never imported into this process. `make oracle` installs it, pinned with hashes in
`requirements-oracle.lock`, into `.venv-oracle/` (`pip install --no-deps --target`: a plain directory,
about 41 MB); the `oracle` fixture starts one subprocess per module, this same Python with
`.venv-oracle` first on PYTHONPATH (so it reuses .venv's torch, transformers, hydra...), which imports
FusionBench's method modules once (about 5 s) and then answers calls over a pipe: tensors go in and
out pickled. Each test builds small random towers, merges them with catmerge and with FusionBench's
own code under matched hyperparameters, and compares the merged updates theta - theta_0 tensor by
tensor (largest difference at most 1e-5 of the tensor's largest entry). Where the two deliberately
differ, a test pins the difference; docs/baselines.md ("Checked against FusionBench") explains each.

Outside `make test`, without `.venv-oracle`, these tests skip; under `make test`
(CATMERGE_REQUIRE_ORACLE=1) a missing oracle fails them.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ORACLE_DIR = ROOT / ".venv-oracle"
ORACLE_STAMP = ORACLE_DIR / ".installed"
ORACLE_VERSION = "0.2.33"
REL = 1e-5

# FusionBench's entry points used here (module:attribute).
SIMPLE_AVERAGE = "fusion_bench.method.simple_average:SimpleAverageAlgorithm"
TASK_ARITHMETIC = "fusion_bench.method.task_arithmetic.task_arithmetic:TaskArithmeticAlgorithm"
TIES = "fusion_bench.method.ties_merging.ties_merging:TiesMergingAlgorithm"
TIES_FLAT = "fusion_bench.method.ties_merging.ties_merging_utils:ties_merging"
REGMEAN = "fusion_bench.method.regmean.regmean:merging_with_regmean_weights"
TSVM = "fusion_bench.method.task_singular_vector.TSVM:TaskSingularVectorMerging"
TSVM_FN = "fusion_bench.method.task_singular_vector.utils.TSVM_utils:compute_and_sum_svd_mem_reduction"
ISO_C = "fusion_bench.method.isotropic_merging.iso:ISO_C_Merge"
ISO_CTS = "fusion_bench.method.isotropic_merging.iso:ISO_CTS_Merge"
ISO_CTS_FN = "fusion_bench.method.isotropic_merging.iso_utils:iso_cts"
WUDI_FN = "fusion_bench.method.wudi.wudi:wudi_merging"  # its Adam lr is fixed at 1e-5
REGMEAN_PLUSPLUS = "fusion_bench.method.regmean_plusplus.clip_regmean_plusplus:RegMeanAlgorithmForCLIPPlusPlus"


# --- the oracle process -------------------------------------------------------------------------

def _oracle_worker() -> None:
    """Runs in the oracle process (its source is sent with `python -c`): imports FusionBench, then
    answers pickled requests on stdin with pickled replies on stdout until stdin closes.
      ("call", "module:function", args, kwargs)                -> its return value
      ("algorithm", "module:Class", init_kwargs, {name: state_dict}) -> the fused model's state dict,
          Class(**init_kwargs).run(pool) on a model pool of nn.Modules built from the state dicts
          ("_pretrained_" is theta_0), as FusionBench's programs run an algorithm
      ("clip_regmean_plusplus", "module:Class", init_kwargs, vision_config, {name: state_dict},
       {name: pixel_values}, layer_tuples) -> the fused model's state dict: Class (FusionBench's
          RegMeanAlgorithmForCLIPPlusPlus) run on HF CLIPVisionModelWithProjection models built
          from the state dicts, with only its data plumbing replaced (below)
    An exception becomes ("raised", its type's name, its message)."""
    import importlib
    import importlib.metadata
    import os
    import pickle
    import sys
    import traceback

    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # FusionBench prints progress: keep it off the reply stream (stderr goes to a log)
    requests = sys.stdin.buffer

    def resolve(target):
        module, _, attr = target.partition(":")
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj

    try:
        import fusion_bench
        import torch
        from fusion_bench.modelpool import BaseModelPool
        from torch import nn

        for module in ("simple_average", "task_arithmetic.task_arithmetic", "ties_merging.ties_merging",
                       "regmean.regmean", "task_singular_vector.TSVM", "isotropic_merging.iso"):
            importlib.import_module(f"fusion_bench.method.{module}")
    except BaseException:  # noqa: BLE001 - reported to the test process, which fails with it
        pickle.dump(("failed", traceback.format_exc()), protocol)
        protocol.flush()
        return

    def as_module(state_dict):
        root = nn.Module()
        for key, value in state_dict.items():
            *path, name = key.split(".")
            module = root
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_parameter(name, nn.Parameter(value.clone(), requires_grad=False))
        return root

    def call(target, args, kwargs):
        return resolve(target)(*args, **kwargs)

    def algorithm(target, init, pool):
        models = {name: as_module(state_dict) for name, state_dict in pool.items()}
        with torch.no_grad():
            fused = resolve(target)(**init).run(BaseModelPool(models))
        return {key: value.detach().clone() for key, value in fused.state_dict().items()}

    def clip_regmean_plusplus(target, init, config, pool, pixels, layer_tuples):
        """FusionBench's CLIP RegMean++ with its own run loop, Gram hooks (get_regmean_weights),
        embedding merge, layer forwards and RegMean solve; replaced is only what needs datasets, a
        Fabric or a zero-shot head: no head (nothing here reads logits), a Fabric whose setup
        hands the module back, and the first layer's input (its compute_input: embeddings, then
        pre_layrnorm) from every pixel tensor of the task in one batch, in order (no shuffling).
        layer_tuples: transformers 5's encoder layers return a tensor where 4's returned
        (hidden_states,), which FusionBench's layer_batches_forward unpacks with [0]: True wraps
        each layer to return the 1-tuple again; False leaves them as installed. The shipped class
        does not construct in 0.2.33 (see its _config_mapping below)."""
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        def as_tuple(forward):
            def forward_as_in_transformers_4(*args, **kwargs):
                out = forward(*args, **kwargs)
                return (out,) if isinstance(out, torch.Tensor) else out
            return forward_as_in_transformers_4

        def as_clip(state_dict):
            model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
            model.to(next(iter(state_dict.values())).dtype).load_state_dict(state_dict)
            if layer_tuples:
                for layer in model.vision_model.encoder.layers:
                    layer.forward = as_tuple(layer.forward)
            return model.eval()

        class ModulesOnly:  # the one Fabric call left: get_regmean_weights' fabric.setup(layer)
            @staticmethod
            def setup(module):
                return module

        class Exemplars(BaseModelPool):
            def load_train_dataset(self, dataset_name, *args, **kwargs):
                return pixels[dataset_name]

        shipped = resolve(target)
        generic = importlib.import_module("fusion_bench.method.regmean_plusplus.regmean_plusplus").RegMeanAlgorithmPlusPlus

        class Plumbing(shipped):
            # the shipped class's plain-dict _config_mapping (no .inverse) breaks the generic class's
            # auto-registering __init__: extend the generic mapping, as its other classes do
            _config_mapping = generic._config_mapping | shipped._config_mapping

            def on_regmean_start(self):
                self.fabric = ModulesOnly()

            def get_input_for_first_layer(self, model, train_dataset):
                image_embeds = model.vision_model.embeddings(train_dataset.to(model.device))
                image_embeds = model.vision_model.pre_layrnorm(image_embeds)
                return [image_embeds.detach().cpu()]

        models = {name: as_clip(state_dict) for name, state_dict in pool.items()}
        with torch.no_grad():
            fused = Plumbing(**init).run(Exemplars(models))
        return {key: value.detach().clone() for key, value in fused.state_dict().items()}

    operations = {"call": call, "algorithm": algorithm, "clip_regmean_plusplus": clip_regmean_plusplus}
    pickle.dump(("ready", fusion_bench.__name__, importlib.metadata.version("fusion-bench")), protocol)
    protocol.flush()
    while True:
        try:
            operation, *args = pickle.load(requests)
        except EOFError:  # the test process is done: skip the interpreter's teardown (Lightning's takes seconds)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        try:
            reply = ("ok", operations[operation](*args))
        except Exception as exc:  # noqa: BLE001 - the test decides whether FusionBench raising is expected
            reply = ("raised", type(exc).__name__, str(exc))
        pickle.dump(reply, protocol)
        protocol.flush()


class OracleRaised(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class Oracle:
    """The FusionBench process: one per test module."""

    def __init__(self, directory: Path):
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - the worker's stderr, open as long as it runs
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(directory)] + [p for p in [env.get("PYTHONPATH")] if p])
        env["CUDA_VISIBLE_DEVICES"] = ""  # FusionBench's Lightning Fabric would pick a GPU: stay on the CPU
        env["PYTHONWARNINGS"] = "ignore"
        source = textwrap.dedent(inspect.getsource(_oracle_worker)) + "\n_oracle_worker()\n"
        self.process = subprocess.Popen([sys.executable, "-c", source], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, cwd=tempfile.gettempdir(), env=env)
        first = self._receive()
        if first[0] != "ready":
            self.close()
            raise RuntimeError(f"the FusionBench oracle in {directory} does not import:\n{first[1]}")
        self.version = first[2]

    def _receive(self):
        try:
            return pickle.load(self.process.stdout)
        except EOFError:
            self.process.wait()
            self.log.seek(0)
            tail = self.log.read()[-4000:].decode(errors="replace")
            raise RuntimeError(f"the FusionBench oracle process died (exit {self.process.returncode}):\n{tail}") from None

    def _ask(self, *request):
        pickle.dump(request, self.process.stdin)
        self.process.stdin.flush()
        reply = self._receive()
        if reply[0] == "raised":
            raise OracleRaised(reply[1], reply[2])
        return reply[1]

    def call(self, target: str, *args, **kwargs):
        return self._ask("call", target, args, kwargs)

    def algorithm(self, target: str, init: dict, pretrained: dict, task_vectors: list[dict]) -> dict:
        pool = {"_pretrained_": pretrained}
        pool.update({f"task{i}": {key: pretrained[key] + tv[key] for key in pretrained} for i, tv in enumerate(task_vectors)})
        return self._ask("algorithm", target, init, pool)

    def clip_regmean_plusplus(self, init: dict, config: dict, pretrained: dict, experts: dict, pixels: dict,
                              layer_tuples: bool = True) -> dict:
        pool = {"_pretrained_": pretrained, **experts}
        return self._ask("clip_regmean_plusplus", REGMEAN_PLUSPLUS, init, config, pool, pixels, layer_tuples)

    def close(self):
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def oracle():
    if not ORACLE_STAMP.exists():
        reason = f"FusionBench oracle not installed ({ORACLE_DIR.name}/ missing): run `make oracle` (or `make test`)"
        if os.environ.get("CATMERGE_REQUIRE_ORACLE"):
            pytest.fail(reason + "; CATMERGE_REQUIRE_ORACLE is set, so this is an error", pytrace=False)
        pytest.skip(reason)
    process = Oracle(ORACLE_DIR)
    assert process.version == ORACLE_VERSION, f".venv-oracle holds fusion-bench {process.version}, the lock pins {ORACLE_VERSION}"
    yield process
    process.close()


def test_fusionbench_stays_out_of_the_test_process(oracle):
    assert "fusion_bench" not in sys.modules
    assert not any(Path(p).resolve() == ORACLE_DIR.resolve() for p in sys.path if p)


# --- catmerge, across its params layouts ----------------------------------------------------------

def _catmerge_merge(method: str, pretrained, task_vectors, params=None, inputs=None):
    """Merged weights from catmerge: `catmerge.merging.merge` where it exists (one entry point for
    every method), else the method module's own `merge` (the older layout)."""
    merging = importlib.import_module("catmerge.merging")
    if hasattr(merging, "merge"):
        return merging.merge(method, pretrained, task_vectors, params, inputs)
    module = importlib.import_module(f"catmerge.merging.{method}")
    return module.merge(pretrained, task_vectors, params) if inputs is None else module.merge(pretrained, task_vectors, params, *inputs)


_OLD_PARAMS = {"ties": "TiesParams", "regmean": "RegMeanParams", "tsv_m": "TsvMParams", "iso_c": "IsoCParams",
               "iso_cts": "IsoCtsParams"}


def _params_class(method: str):
    module = importlib.import_module(f"catmerge.merging.{method}")
    if getattr(module, "PARAMS", None) is not None:
        return module.PARAMS
    return getattr(importlib.import_module("catmerge.params"), _OLD_PARAMS.get(method, "-"), None)


def method_params(method: str, **values):
    """The method's params block with these values (a plain namespace where catmerge has no class
    for it, e.g. Task Arithmetic's alpha in the older layout)."""
    cls = _params_class(method)
    return SimpleNamespace(**values) if cls is None else cls(**values)


def has_field(method: str, name: str) -> bool:
    cls = _params_class(method)
    return cls is not None and name in cls.model_fields


def ties_params(k: float, alpha: float, trim: str | None = None):
    values = {"k": float(k), "alpha": float(alpha)}
    if trim is not None and has_field("ties", "trim"):
        values["trim"] = trim
    return method_params("ties", **values)


def _regmean_inputs(pieces, layer_inputs):
    merging = importlib.import_module("catmerge.merging")
    if hasattr(merging, "MergeInputs"):
        return merging.MergeInputs(pieces=pieces, layer_inputs=layer_inputs)
    return (pieces, layer_inputs)


# --- towers and comparisons ---------------------------------------------------------------------

# A small tower: linear weights and biases, a norm, a conv kernel (4-D), a 2-D tensor that is no
# linear layer (a positional embedding), and a 0-d scalar. 625 entries in all.
SHAPES = {
    "patch.weight": (8, 3, 2, 2),
    "pos": (7, 12),
    "layer0.weight": (16, 12),
    "layer0.bias": (16,),
    "norm.weight": (16,),
    "norm.bias": (16,),
    "layer1.weight": (12, 16),
    "layer1.bias": (12,),
    "scale": (),
}


def tower(seed: int, tasks: int, shapes=SHAPES, dtype=torch.float64) -> tuple[dict, list[dict]]:
    """theta_0 and `tasks` task vectors of different sizes (continuous random values: no ties)."""
    gen = torch.Generator().manual_seed(seed)
    theta0 = {key: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for key, shape in shapes.items()}
    tvs = [{key: (0.02 * (1 + t) * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype) for key, shape in shapes.items()}
           for t in range(tasks)]
    return theta0, tvs


def update(merged: dict, theta0: dict) -> dict:
    return {key: merged[key].double() - theta0[key].double() for key in theta0}


def assert_agree(ours: dict, theirs: dict, rel: float = REL, what: str = "") -> None:
    """Same keys and shapes; per tensor, max |ours - theirs| <= rel * max |theirs|."""
    assert set(ours) == set(theirs), f"{what}: keys differ: {set(ours) ^ set(theirs)}"
    for key, value in theirs.items():
        a, b = ours[key].double(), value.double()
        assert a.shape == b.shape, f"{what} {key}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
        scale = float(b.abs().max()) if b.numel() else 0.0
        err = float((a - b).abs().max()) if b.numel() else 0.0
        assert err <= rel * max(scale, 1e-300), f"{what} {key}: max |catmerge - FusionBench| = {err:.3g} ({err / max(scale, 1e-300):.3g} of its largest entry)"


def assert_merged_agree(ours: dict, theirs: dict, theta0: dict, what: str) -> None:
    """float64: the updates theta - theta_0 agree to REL of their own size. float32: a merged weight
    is rounded at theta_0's scale (~1e-7 of it), far coarser than the update, so the merged weights
    themselves are compared (to REL of their size), and their dtypes."""
    assert all(ours[key].dtype == theirs[key].dtype == theta0[key].dtype for key in theta0), what
    if all(value.dtype == torch.float64 for value in theta0.values()):
        assert_agree(update(ours, theta0), update(theirs, theta0), what=what)
    else:
        assert_agree(ours, theirs, what=what)


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# --- weight averaging and Task Arithmetic -------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weight_averaging(oracle, dtype):
    theta0, tvs = tower(0, 4, dtype=dtype)
    ours = _catmerge_merge("weight_averaging", theta0, tvs)
    theirs = oracle.algorithm(SIMPLE_AVERAGE, {"inplace": False}, theta0, tvs)
    assert_merged_agree(ours, theirs, theta0, "weight averaging")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_task_arithmetic(oracle, dtype):
    theta0, tvs = tower(1, 3, dtype=dtype)
    ours = _catmerge_merge("task_arithmetic", theta0, tvs, method_params("task_arithmetic", alpha=0.3))
    theirs = oracle.algorithm(TASK_ARITHMETIC, {"scaling_factor": 0.3}, theta0, tvs)
    assert_merged_agree(ours, theirs, theta0, "task arithmetic")


def test_task_arithmetic_merge_function_raises_on_modules(oracle):
    """FusionBench's `task_arithmetic_merge()` (the function, not the algorithm class) fails on plain
    nn.Modules: it subtracts state dicts taken with keep_vars=True, so the running sum is a Tensor
    while the next model's entries are Parameters, and its strict key/type check raises."""
    theta0, tvs = tower(2, 2)
    with pytest.raises(OracleRaised) as raised:
        oracle.call("fusion_bench.method.task_arithmetic.task_arithmetic:task_arithmetic_merge",
                    *_as_modules_request(theta0, tvs), 0.3)
    assert raised.value.kind == "TypeError"


def _as_modules_request(theta0, tvs):
    """Arguments for a FusionBench function that takes nn.Modules: built here from the state dicts
    (torch's nn.Module pickles without FusionBench)."""
    from torch import nn

    def as_module(state_dict):
        root = nn.Module()
        for key, value in state_dict.items():
            *path, name = key.split(".")
            module = root
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_parameter(name, nn.Parameter(value.clone(), requires_grad=False))
        return root

    return as_module(theta0), [as_module({key: theta0[key] + tv[key] for key in theta0}) for tv in tvs]


# --- TIES-Merging -------------------------------------------------------------------------------

def _ties_oracle_per_tensor(oracle, tvs, k):
    """FusionBench's TIES applied to each tensor on its own (its `ties_merging` on the stacked,
    flattened task vectors of one tensor): the per-tensor convention."""
    out = {}
    for key in tvs[0]:
        flat = torch.stack([tv[key].reshape(-1) for tv in tvs])
        out[key] = oracle.call(TIES_FLAT, flat, reset_thresh=k, merge_func="mean").reshape(tvs[0][key].shape)
    return out


def test_ties_single_tensor_agrees_under_either_trim(oracle):
    """One tensor: global and per-tensor trimming are the same thing, so this holds whatever
    catmerge's TIES default is. 16 x 12 = 192 entries, k = 30: 57.6 is not a whole number, so
    FusionBench's count (floor + 1) and catmerge's (ceil) coincide; no summed entry is exactly 0."""
    theta0, tvs = tower(3, 4, shapes={"layer0.weight": (16, 12)})
    ours = _catmerge_merge("ties", theta0, tvs, ties_params(30, 0.7))
    theirs = oracle.algorithm(TIES, {"scaling_factor": 0.7, "threshold": 30, "remove_keys": [], "merge_func": "mean"}, theta0, tvs)
    assert_agree(update(ours, theta0), update(theirs, theta0), what="TIES, one tensor")


def test_ties_global_trim_agrees_on_a_tower(oracle):
    """The published trim, over the whole task vector flattened (FusionBench's TiesMergingAlgorithm
    with merge_func='mean', the paper's disjoint mean; its config default is 'sum'). 625 entries,
    k = 30: 187.5 kept by both."""
    if not has_field("ties", "trim"):
        pytest.skip("catmerge's TIES has no `trim` option yet: it trims per tensor only")
    theta0, tvs = tower(4, 3)
    ours = _catmerge_merge("ties", theta0, tvs, ties_params(30, 0.5, trim="global"))
    theirs = oracle.algorithm(TIES, {"scaling_factor": 0.5, "threshold": 30, "remove_keys": [], "merge_func": "mean"}, theta0, tvs)
    assert_agree(update(ours, theta0), update(theirs, theta0), what="TIES, global trim")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ties_per_tensor_trim_agrees_with_the_oracle_per_tensor(oracle, dtype):
    """catmerge's per-tensor trim (the `per_tensor` option, or the only trim of older versions)
    against FusionBench's TIES run on each tensor alone. k = 30 gives a fractional count in every
    tensor of the tower (57.6, 4.8, 3.6, 28.8, 25.2, 0.3)."""
    theta0, tvs = tower(5, 3, dtype=dtype)
    ours = _catmerge_merge("ties", theta0, tvs, ties_params(30, 0.8, trim="per_tensor"))
    merged_tv = _ties_oracle_per_tensor(oracle, tvs, 30)
    theirs = {key: theta0[key] + 0.8 * merged_tv[key] for key in theta0}  # as TiesMergingAlgorithm.run adds it
    assert_merged_agree(ours, theirs, theta0, "TIES, per-tensor trim")


def test_ties_per_tensor_and_global_trims_differ_on_a_tower(oracle):
    """Pinned: with several tensors, the two trims keep different entries (the global one keeps more
    of the tensors whose updates are large), so a per-tensor TIES is not FusionBench's."""
    theta0, tvs = tower(6, 3)
    tvs = [{key: value * (10.0 if key == "layer0.weight" else 1.0) for key, value in tv.items()} for tv in tvs]
    theirs = oracle.algorithm(TIES, {"scaling_factor": 1.0, "threshold": 30, "remove_keys": [], "merge_func": "mean"}, theta0, tvs)
    ours = _catmerge_merge("ties", theta0, tvs, ties_params(30, 1.0, trim="per_tensor"))
    assert relative_gap(update(ours, theta0)["layer1.weight"], update(theirs, theta0)["layer1.weight"]) > 0.1


def test_ties_kept_count_differs_when_k_percent_is_whole(oracle):
    """Pinned: FusionBench keeps every entry >= the (n - floor(k n))-th smallest magnitude, i.e.
    floor(k n) + 1 entries; catmerge keeps exactly ceil(k n). They differ by one entry whenever k n
    is a whole number: 20 % of 10 entries is 3 entries there, 2 here."""
    theta0, tvs = tower(7, 1, shapes={"w": (10,)})
    ours = update(_catmerge_merge("ties", theta0, tvs, ties_params(20, 1.0)), theta0)["w"]
    theirs = update(oracle.algorithm(TIES, {"scaling_factor": 1.0, "threshold": 20, "remove_keys": [], "merge_func": "mean"},
                                     theta0, tvs), theta0)["w"]
    assert int((ours.abs() > 1e-12).sum()) == 2
    assert int((theirs.abs() > 1e-12).sum()) == 3
    # 25 % of 10 = 2.5: both keep 3
    ours = update(_catmerge_merge("ties", theta0, tvs, ties_params(25, 1.0)), theta0)["w"]
    theirs = update(oracle.algorithm(TIES, {"scaling_factor": 1.0, "threshold": 25, "remove_keys": [], "merge_func": "mean"},
                                     theta0, tvs), theta0)["w"]
    assert_agree({"w": ours}, {"w": theirs}, what="TIES, k n fractional")


def test_ties_oracle_crashes_at_100_and_reads_small_k_as_a_fraction(oracle):
    """Pinned oracle faults: `topk_values_mask` asks `kthvalue(0)` at k = 100 % and raises; a
    threshold <= 1 is read as a fraction, so k = 1 means 100 % (and raises too) and k = 0.5 means
    50 %. catmerge's k is always a percent in (0, 100]: k = 100 keeps everything (the disjoint mean
    of the whole vectors)."""
    theta0, tvs = tower(8, 3, shapes={"w": (40,)})
    flat = torch.stack([tv["w"] for tv in tvs])
    for k in (100, 1):
        with pytest.raises(OracleRaised) as raised:
            oracle.call(TIES_FLAT, flat, reset_thresh=k, merge_func="mean")
        assert raised.value.kind == "RuntimeError" and "kthvalue" in str(raised.value)
    ours = update(_catmerge_merge("ties", theta0, tvs, ties_params(100, 1.0)), theta0)["w"]
    signs = torch.sign(flat.sum(0))
    agree = torch.sign(flat) == signs
    expected = (flat * agree).sum(0) / agree.sum(0)
    assert_agree({"w": ours}, {"w": expected}, what="TIES, k = 100")
    # 0.5 is 50 % there: 21 of 40 entries per task (floor(20) + 1); here 0.5 % of 40 rounds up to 1
    half = oracle.call("fusion_bench.method.ties_merging.ties_merging_utils:topk_values_mask", flat, K=0.5)[0]
    assert [int((row != 0).sum()) for row in half] == [21, 21, 21]
    ours = update(_catmerge_merge("ties", theta0, tvs[:1], ties_params(0.5, 1.0)), theta0)["w"]
    assert int((ours != 0).sum()) == 1


def test_ties_zero_sum_entries(oracle):
    """Entries whose trimmed values sum to exactly 0. FusionBench gives them the majority sign
    (the sign of the sum of all elected signs, over the whole flattened vector), and where that
    majority is itself 0 it keeps the negative entries (its `torch.where(sign > 0, v > 0, v < 0)`).
    catmerge with the published trim gives them the model's majority sign too, and elects no sign
    (the entry keeps theta_0) where there is no majority; older catmerge (no `trim` option) elected
    no sign for them at all."""
    theta0 = {"w": torch.zeros(4, dtype=torch.float64)}
    # k = 99 keeps all 4 entries on both sides (floor(3.96) + 1 = 4 = ceil(3.96))
    tvs = [{"w": torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)},
           {"w": torch.tensor([-1.0, 1.0, 1.0, 0.25], dtype=torch.float64)}]
    theirs = oracle.algorithm(TIES, {"scaling_factor": 1.0, "threshold": 99, "remove_keys": [], "merge_func": "mean"}, theta0, tvs)["w"]
    assert theirs.tolist() == [1.0, -2.0, 2.0, 0.375]  # entry 0: sums to 0, majority + -> the +1 of task 0
    ours = _catmerge_merge("ties", theta0, tvs, ties_params(99, 1.0, trim="global"))["w"]
    if has_field("ties", "trim"):
        assert ours.tolist() == theirs.tolist()
    else:
        assert ours.tolist() == [0.0, -2.0, 2.0, 0.375]
    # no majority: elected signs 0, -1, +1 sum to 0
    tvs = [{"w": torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)},
           {"w": torch.tensor([-1.0, 1.0, -2.0], dtype=torch.float64)}]
    theta0 = {"w": torch.zeros(3, dtype=torch.float64)}
    theirs = oracle.algorithm(TIES, {"scaling_factor": 1.0, "threshold": 99, "remove_keys": [], "merge_func": "mean"}, theta0, tvs)["w"]
    assert theirs.tolist() == [-1.0, -2.0, 3.0]  # entry 0 takes task 1's negative value
    ours = _catmerge_merge("ties", theta0, tvs, ties_params(99, 1.0, trim="global"))["w"]
    assert ours.tolist() == [0.0, -2.0, 3.0]


def test_ties_fusionbench_default_sum_is_not_the_disjoint_mean(oracle):
    """Pinned: FusionBench's shipped TIES config uses merge_func 'sum' (with scaling_factor 0.3), a
    disjoint sum; catmerge follows the paper's disjoint mean, so its alphas are on another scale."""
    theta0, tvs = tower(9, 3, shapes={"layer0.weight": (16, 12)})
    ours = update(_catmerge_merge("ties", theta0, tvs, ties_params(30, 1.0)), theta0)["layer0.weight"]
    summed = update(oracle.algorithm(TIES, {"scaling_factor": 1.0, "threshold": 30, "remove_keys": [], "merge_func": "sum"},
                                     theta0, tvs), theta0)["layer0.weight"]
    assert relative_gap(ours, summed) > 0.1
    assert bool(((summed.abs() + 1e-15) >= ours.abs()).all())  # a sum of agreeing values is never smaller than their mean


# --- RegMean ------------------------------------------------------------------------------------

MODULE_OF = {"x0": "layer0", "x1": "layer1"}  # FusionBench keys Grams by module name: `layer0` for `layer0.weight`


def _regmean_case(seed: int, rows: list[int], tasks: int = 3):
    theta0, tvs = tower(seed, tasks)
    gen = torch.Generator().manual_seed(seed + 100)
    inputs = [{"x0": torch.randn(n, 12, generator=gen, dtype=torch.float64),
               "x1": torch.randn(n, 16, generator=gen, dtype=torch.float64)} for n in rows]
    return theta0, tvs, inputs


def _catmerge_regmean(theta0, tvs, inputs, scale):
    from catmerge.adapters import Piece
    from catmerge.cat import LayerInput

    pieces = [Piece("layer0.weight", "layer0.weight", "linear", "x0", 0, 16), Piece("layer1.weight", "layer1.weight", "linear", "x1", 0, 12)]
    layer_inputs = [{name: LayerInput(rows=x) for name, x in by_name.items()} for by_name in inputs]
    params = method_params("regmean", nondiagonal_scale=scale, alpha=1.0)
    return _catmerge_merge("regmean", theta0, tvs, params, _regmean_inputs(pieces, layer_inputs))


def _oracle_regmean(oracle, theta0, tvs, grams, scale):
    """FusionBench's `merging_with_regmean_weights` on the experts' full weights theta_0 + T_k,
    with Gram matrices per module name (`layer0` for `layer0.weight`)."""
    experts = {key: [theta0[key] + tv[key] for tv in tvs] for key in theta0}
    return oracle.call(REGMEAN, experts, grams, reduce_non_diagonal_ratio=scale)


@pytest.mark.parametrize("scale", [1.0, 0.9])
def test_regmean_agrees_on_well_conditioned_grams(oracle, scale):
    """40 input rows per task (> d_in): sum_k G_k is invertible. FusionBench's Gram is the mean
    X^T X / n over rows (its hook); with the same n for every task that is catmerge's X^T X up to a
    common factor, which cancels. Everything not a linear weight is averaged on both sides
    (biases, norms, the conv kernel, the positional embedding, the scalar)."""
    theta0, tvs, inputs = _regmean_case(10, [40, 40, 40])
    ours = _catmerge_regmean(theta0, tvs, inputs, scale)
    grams = [{MODULE_OF[name]: x.T @ x / x.shape[0] for name, x in by_name.items()} for by_name in inputs]
    theirs = _oracle_regmean(oracle, theta0, tvs, grams, scale)
    assert_agree(update(ours, theta0), update(theirs, theta0), what=f"RegMean, scale {scale}")


def test_regmean_solve_agrees(oracle):
    """catmerge.merging.regmean.solve on given (already regularised) Grams vs FusionBench with
    ratio 1 on the same Grams."""
    from catmerge.merging.regmean import solve

    gen = torch.Generator().manual_seed(11)
    xs = [torch.randn(30, 12, generator=gen, dtype=torch.float64) for _ in range(4)]
    grams = [x.T @ x for x in xs]
    deltas = [0.1 * torch.randn(16, 12, generator=gen, dtype=torch.float64) for _ in range(4)]
    theirs = oracle.call(REGMEAN, {"l.weight": deltas}, [{"l": g} for g in grams], reduce_non_diagonal_ratio=1.0)["l.weight"]
    assert_agree({"l": solve(deltas, grams)}, {"l": theirs}, what="RegMean solve")


def test_regmean_unequal_row_counts(oracle):
    """Pinned: FusionBench normalises each task's Gram by its row count (X^T X / n), so every task
    weighs the same; catmerge uses X^T X as published, so a task with more rows weighs more. With 20,
    40 and 80 rows the answers differ; given the raw sums, FusionBench agrees with catmerge."""
    theta0, tvs, inputs = _regmean_case(12, [20, 40, 80])
    ours = update(_catmerge_regmean(theta0, tvs, inputs, 1.0), theta0)
    means = [{MODULE_OF[n]: x.T @ x / x.shape[0] for n, x in by_name.items()} for by_name in inputs]
    sums = [{MODULE_OF[n]: x.T @ x for n, x in by_name.items()} for by_name in inputs]
    assert relative_gap(ours["layer0.weight"], update(_oracle_regmean(oracle, theta0, tvs, means, 1.0), theta0)["layer0.weight"]) > 1e-3
    assert_agree(ours, update(_oracle_regmean(oracle, theta0, tvs, sums, 1.0), theta0), what="RegMean, raw Gram sums")


def test_regmean_singular_gram(oracle):
    """Pinned: where no task's input reaches some input directions, sum_k G_k is singular.
    Exactly singular (three input coordinates always 0): FusionBench's torch.inverse raises.
    Numerically singular (3 rows in all for d_in = 12): it returns a weight far off (rounding
    amplified on the directions no input reaches). catmerge returns the minimum-norm least-squares
    solution: it satisfies the normal equations and leaves those directions at theta_0."""
    from catmerge.merging.regmean import solve

    gen = torch.Generator().manual_seed(13)
    deltas = [0.1 * torch.randn(16, 12, generator=gen, dtype=torch.float64) for _ in range(3)]
    xs = [torch.cat([torch.randn(20, 9, generator=gen, dtype=torch.float64), torch.zeros(20, 3, dtype=torch.float64)], 1) for _ in range(3)]
    grams = [x.T @ x for x in xs]
    with pytest.raises(OracleRaised) as raised:
        oracle.call(REGMEAN, {"l.weight": deltas}, [{"l": g} for g in grams], reduce_non_diagonal_ratio=1.0)
    assert "singular" in str(raised.value)
    ours = solve(deltas, grams)
    assert float(ours[:, 9:].abs().max()) < 1e-12
    residual = sum(grams) @ ours.T - sum(g @ d.T for g, d in zip(grams, deltas))
    assert float(residual.abs().max()) < 1e-9 * float(sum(grams).abs().max())

    xs = [torch.randn(1, 12, generator=gen, dtype=torch.float64) for _ in range(3)]
    grams = [x.T @ x for x in xs]
    ours = solve(deltas, grams)
    basis = torch.cat(xs)  # the directions some input reaches
    null = torch.eye(12, dtype=torch.float64) - torch.linalg.pinv(basis) @ basis
    assert float((ours @ null).abs().max()) < 1e-9
    try:
        theirs = oracle.call(REGMEAN, {"l.weight": deltas}, [{"l": g} for g in grams], reduce_non_diagonal_ratio=1.0)["l.weight"]
    except OracleRaised:
        return  # a LAPACK that detects the singularity raises: off either way
    # its answer is ours plus whatever rounding-level pivots make of the unreached directions: over
    # 40 seeds here, off by 12 to 1e4 times the answer's size
    assert not torch.isfinite(theirs).all() or relative_gap(theirs, ours) > 1.0


# --- RegMean++ ----------------------------------------------------------------------------------

# A tiny HF CLIP vision tower: 2 encoder layers, width 16, MLP 32, 16 patches + the class token.
CLIP_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
               "num_attention_heads": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 8}
AFTER_THE_LAYERS = ("vision_model.post_layernorm.", "visual_projection.")


def _clip_case(seed: int, tasks: int = 3, images: int = 4):
    """(tower, theta_0, {task: expert}, {task: uint8 images}): a float64 catmerge HF CLIP tower,
    experts moved from theta_0 in every tensor, the same number of exemplar images per task."""
    from catmerge.models import hf_clip_image_tower

    torch.manual_seed(seed)
    vision = {k: v for k, v in CLIP_VISION.items() if k != "projection_dim"}
    tower = hf_clip_image_tower({"embed_dim": CLIP_VISION["projection_dim"], "vision_cfg": vision}).double().eval()
    theta0 = {key: value.detach().clone() for key, value in tower.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 100)
    names = [f"task{t}" for t in range(tasks)]
    experts = {name: {key: value + 0.05 * torch.randn(value.shape, generator=gen, dtype=value.dtype) * (value.abs().mean() + 1e-3)
                      for key, value in theta0.items()} for name in names}
    exemplars = {name: torch.randint(0, 256, (images, 32, 32, 3), generator=gen, dtype=torch.uint8) for name in names}
    return tower, theta0, experts, exemplars


def _oracle_regmean_plusplus(oracle, theta0, experts, exemplars, scale, layer_tuples=True):
    """FusionBench's RegMean++ on the pixel values catmerge's capture feeds the tower (its
    evaluation preprocessing of the same uint8 images), all of a task's exemplars in one batch."""
    from catmerge.models import normalize_images

    init = {"num_regmean_examples": len(next(iter(exemplars.values()))), "exclude_param_names_regex": [],
            "reduce_non_diagonal_ratio": scale, "weight_transpose": True, "dataloader_kwargs": {}}
    pixels = {name: normalize_images(images) for name, images in exemplars.items()}
    return oracle.clip_regmean_plusplus(init, CLIP_VISION, theta0, experts, pixels, layer_tuples)


@pytest.mark.parametrize("scale", [1.0, 0.9])
def test_regmean_plusplus_agrees_on_clip_towers(oracle, scale):
    """FusionBench's RegMeanAlgorithmForCLIPPlusPlus (its run loop, Gram hooks, embedding merge,
    layer forwards, RegMean solve; only the data plumbing replaced) against catmerge.merge, float64
    towers, 3 tasks of 4 images (68 token rows each: the per-row averaging of FusionBench's Grams
    cancels). Embeddings and pre_layrnorm: the mean on both sides; each encoder layer: RegMean on
    its inputs through the merged embeddings and layers before it (largest gap about 3e-7: catmerge
    captures the rows in float32). Pinned: FusionBench leaves what follows the last encoder layer
    (post_layernorm, visual_projection) at theta_0, catmerge merges it (the mean of the experts,
    alpha 1). Plain RegMean (each expert's own inputs) is 3 to 13 % off: the check sees the
    difference RegMean++ makes."""
    import catmerge

    tower, theta0, experts, exemplars = _clip_case(70)
    ours = catmerge.merge("regmean_plusplus", theta0, experts, exemplars=exemplars, model=tower,
                          nondiagonal_scale=scale, alpha=1.0)
    theirs = _oracle_regmean_plusplus(oracle, theta0, experts, exemplars, scale)
    assert set(ours) == set(theirs) == set(theta0)
    assert all(ours[key].dtype == theirs[key].dtype == torch.float64 for key in theta0)
    layers = {key for key in theta0 if not key.startswith(AFTER_THE_LAYERS)}
    assert {key for key in layers if ".encoder.layers.1." in key} and {key for key in layers if key.startswith("vision_model.embeddings.")}
    assert_agree({k: v for k, v in update(ours, theta0).items() if k in layers},
                 {k: v for k, v in update(theirs, theta0).items() if k in layers}, what=f"RegMean++, scale {scale}")
    after = sorted(set(theta0) - layers)
    assert after == ["vision_model.post_layernorm.bias", "vision_model.post_layernorm.weight", "visual_projection.weight"]
    assert all(torch.equal(theirs[key], theta0[key]) for key in after)
    mean = {key: sum(expert[key] for expert in experts.values()) / len(experts) - theta0[key] for key in after}
    assert_agree({key: update(ours, theta0)[key] for key in after}, mean, what="RegMean++ after the last layer")

    plain = catmerge.merge("regmean", theta0, experts, exemplars=exemplars, model=tower, nondiagonal_scale=scale, alpha=1.0)
    fc2 = "vision_model.encoder.layers.1.mlp.fc2.weight"
    assert relative_gap(update(plain, theta0)[fc2], update(theirs, theta0)[fc2]) > 1e-3


def test_regmean_plusplus_fusionbench_under_transformers_5(oracle):
    """Pinned oracle fault: FusionBench 0.2.33's `layer_batches_forward` takes `layer(...)[0]`,
    the hidden states in transformers 4's (hidden_states,) tuple; transformers 5's encoder layers
    return the tensor itself, so [0] is the first exemplar's (17, 16) hidden states: the next
    layer's Grams see one image, and its attention, fed 2-D hidden states, splits heads along the
    wrong axes (out_proj's and fc2's inputs are no attention output). As installed (no tuple
    wrapper) nothing raises, the embeddings and layer 0 still agree, and layer 1 is far off (50 to
    260 % on the tower above)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 encoder layers return (hidden_states,): FusionBench's [0] is right there")
    import catmerge

    tower, theta0, experts, exemplars = _clip_case(71)
    ours = update(catmerge.merge("regmean_plusplus", theta0, experts, exemplars=exemplars, model=tower,
                                 nondiagonal_scale=1.0, alpha=1.0), theta0)
    theirs = update(_oracle_regmean_plusplus(oracle, theta0, experts, exemplars, 1.0, layer_tuples=False), theta0)
    early = [key for key in theta0 if key.startswith(("vision_model.embeddings.", "vision_model.pre_layrnorm.", "vision_model.encoder.layers.0."))]
    assert_agree({key: ours[key] for key in early}, {key: theirs[key] for key in early}, what="RegMean++ up to layer 0, transformers 5")
    fc1 = "vision_model.encoder.layers.1.mlp.fc1.weight"
    assert relative_gap(ours[fc1], theirs[fc1]) > 1e-3


def test_regmean_plusplus_clip_class_does_not_construct(oracle):
    """Pinned oracle fault: FusionBench 0.2.33's RegMeanAlgorithmForCLIPPlusPlus sets
    `_config_mapping` to a plain dict and is not @auto_register_config'd, so the auto-registering
    __init__ it inherits looks up `_config_mapping.inverse` and raises (hydra's instantiate of its
    shipped clip_regmean_plusplus.yaml too). The oracle's subclass extends the generic class's
    mapping instead, and changes nothing else."""
    with pytest.raises(OracleRaised) as raised:
        oracle.call(REGMEAN_PLUSPLUS, num_regmean_examples=4, exclude_param_names_regex=[], reduce_non_diagonal_ratio=1.0,
                    weight_transpose=True, dataloader_kwargs={})
    assert raised.value.kind == "AttributeError" and "inverse" in str(raised.value)


# --- TSV-M, Iso-C, Iso-CTS ----------------------------------------------------------------------

@pytest.mark.parametrize("tasks", [3, 4, 5])
def test_tsv_m(oracle, tasks):
    """FusionBench's TaskSingularVectorMerging (alpha after the merge): every 2-D tensor, the
    positional embedding too, gets the TSV merge; the rest the mean. 5 tasks leave 2 of 12 and 2 of
    7 directions unused (floor(p / T) each)."""
    module = pytest.importorskip("catmerge.merging.tsv_m")
    assert module is not None
    theta0, tvs = tower(20 + tasks, tasks)
    ours = _catmerge_merge("tsv_m", theta0, tvs, method_params("tsv_m", alpha=0.7))
    theirs = oracle.algorithm(TSVM, {"alpha": 0.7}, theta0, tvs)
    assert_agree(update(ours, theta0), update(theirs, theta0), what=f"TSV-M, {tasks} tasks")


def test_tsv_m_more_tasks_than_directions(oracle):
    """Pinned: a 2-D tensor with min(m, n) < T gives every task floor(p / T) = 0 directions.
    FusionBench then merges it to 0 (an all-zero stack); catmerge falls back to the mean."""
    pytest.importorskip("catmerge.merging.tsv_m")
    theta0, tvs = tower(30, 3, shapes={"head.weight": (2, 12), "layer0.weight": (16, 12)})
    ours = update(_catmerge_merge("tsv_m", theta0, tvs, method_params("tsv_m", alpha=1.0)), theta0)
    theirs = oracle.call(TSVM_FN, tvs, exclude_keys=[], accelerator="cpu")
    assert float(theirs["head.weight"].abs().max()) == 0.0
    assert_agree({"h": ours["head.weight"]}, {"h": sum(tv["head.weight"] for tv in tvs) / 3}, what="TSV-M fallback")
    assert_agree({"w": ours["layer0.weight"]}, {"w": theirs["layer0.weight"]}, what="TSV-M")


@pytest.mark.parametrize("tasks", [3, 4])
def test_iso_c(oracle, tasks):
    pytest.importorskip("catmerge.merging.iso_c")
    theta0, tvs = tower(40 + tasks, tasks)
    ours = _catmerge_merge("iso_c", theta0, tvs, method_params("iso_c", alpha=1.5))
    theirs = oracle.algorithm(ISO_C, {"scaling_factor": 1.5}, theta0, tvs)
    assert_agree(update(ours, theta0), update(theirs, theta0), what=f"Iso-C, {tasks} tasks")


@pytest.mark.parametrize(("tasks", "fraction"), [(3, 0.8), (4, 0.8), (3, 0.5), (5, 0.3), (3, 1.0)])
def test_iso_cts(oracle, tasks, fraction):
    """Sizes follow the authors' rounding on both sides (12 directions, 3 tasks, 0.8: 9 common + 1
    each; 7 directions: 7 - 3 round(2/3) = 4 common + 1 each); fraction 1 is Iso-C."""
    pytest.importorskip("catmerge.merging.iso_cts")
    theta0, tvs = tower(50 + tasks, tasks)
    params = method_params("iso_cts", alpha=1.5, common_fraction=fraction)
    ours = _catmerge_merge("iso_cts", theta0, tvs, params)
    theirs = oracle.algorithm(ISO_CTS, {"scaling_factor": 1.5, "common_space_fraction": fraction}, theta0, tvs)
    assert_agree(update(ours, theta0), update(theirs, theta0), what=f"Iso-CTS, {tasks} tasks, fraction {fraction}")


def test_iso_cts_no_room_for_a_common_space(oracle):
    """Pinned: when the task shares leave a negative common size (p = 2, 3 tasks, fraction 0.1:
    2 - 3 round(2/3) = -1), FusionBench slices u[:, :-1] and silently drops directions (a broadcast
    into empty slices); catmerge falls back to the mean of the task vectors."""
    pytest.importorskip("catmerge.merging.iso_cts")
    theta0, tvs = tower(60, 3, shapes={"head.weight": (2, 12)})
    ours = update(_catmerge_merge("iso_cts", theta0, tvs, method_params("iso_cts", alpha=1.0, common_fraction=0.1)), theta0)
    mean = sum(tv["head.weight"] for tv in tvs) / 3
    assert_agree({"h": ours["head.weight"]}, {"h": mean}, what="Iso-CTS fallback")
    theirs = oracle.call(ISO_CTS_FN, tvs, common_space_fraction=0.1, accelerator="cpu")["head.weight"]
    assert relative_gap(theirs, mean) > 0.1


# --- WUDI ---------------------------------------------------------------------------------------

def _oracle_wudi(oracle, tvs, iterations):
    """FusionBench's `wudi_merging` on the CPU (its Adam lr is fixed at 1e-5): the merged task
    vector. `WUDIMerging.run` only adds it to theta_0, and cannot run under the oracle's
    `algorithm`, which holds torch.no_grad (its loss.backward() raises there)."""
    return {key: value.detach() for key, value in oracle.call(WUDI_FN, tvs, accelerator="cpu", iter_num=iterations).items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_wudi(oracle, dtype):
    """Every 2-D tensor (the positional embedding too) gets the Adam steps from the sum, the rest
    the mean, no scaling after: catmerge's closed-form gradient takes the steps FusionBench's
    autograd takes. FusionBench runs in the task vectors' dtype, catmerge in float64 whatever it is
    given: on float32 task vectors the trajectories stay within float32 rounding (about 1e-6 of the
    largest entry after 400 steps), so the merged vectors are compared too, not only the weights."""
    theta0, tvs = tower(80, 3, dtype=dtype)
    params = method_params("wudi", iterations=100, lr=1e-5)
    ours = _catmerge_merge("wudi", theta0, tvs, params)
    theirs = _oracle_wudi(oracle, tvs, 100)
    assert_merged_agree(ours, {key: theta0[key] + theirs[key] for key in theta0}, theta0, f"WUDI {dtype}")
    from catmerge.merging.wudi import merged_vector

    assert_agree(merged_vector(tvs, params), theirs, what=f"WUDI {dtype}, merged vectors")
    assert relative_gap(theirs["layer0.weight"], sum(tv["layer0.weight"] for tv in tvs)) > 1e-3  # the steps moved it


def test_wudi_at_the_default_budget(oracle):
    """FusionBench's config runs 400 steps (lr 1e-5), catmerge's defaults: still the same steps."""
    theta0, tvs = tower(81, 3, shapes={"layer1.weight": (12, 16), "layer1.bias": (12,)})
    ours = update(_catmerge_merge("wudi", theta0, tvs, method_params("wudi")), theta0)
    assert_agree(ours, _oracle_wudi(oracle, tvs, 400), what="WUDI, 400 steps")


def test_wudi_weight_one_expert_left_unchanged(oracle):
    """Pinned: a task whose update of a weight is exactly 0 (a frozen weight) makes its loss term
    0/0. FusionBench's weight comes out NaN; catmerge leaves the term out, which is the merge of
    the other tasks."""
    theta0, tvs = tower(82, 3, shapes={"layer0.weight": (16, 12)})
    tvs[1]["layer0.weight"].zero_()
    assert bool(_oracle_wudi(oracle, tvs, 3)["layer0.weight"].isnan().all())
    params = method_params("wudi", iterations=3)
    ours = update(_catmerge_merge("wudi", theta0, tvs, params), theta0)
    assert torch.equal(ours["layer0.weight"], update(_catmerge_merge("wudi", theta0, tvs[:1] + tvs[2:], params), theta0)["layer0.weight"])
