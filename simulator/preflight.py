"""Pre-flight: what a run would refuse once it has started, checked before anything runs.

``load_scenario`` checks what the YAML says (keys, types, ranges, cross-field rules) and never
touches the disk. ``preflight(scenario)`` checks what the scenario needs from this machine and
from its data, without loading a tensor: the dataset's files (in ``data.root`` when it is set,
and only there), the Python packages that ship bundled datasets and text models, a text
model's local files, the trace CSV (parsed in full), the device, whether the model fits the
dataset's samples, the validation split against the training set (``data.validation``: fewer
samples than the training set, at least one of each class), sizes bounded by the training
samples left (clients, shards, batch) and the evaluation subset bounded by the evaluation set,
test or validation (``eval.subset``). It also
draws the time model (device speeds, bandwidths: cheap) so a distribution that can draw an
unusable speed fails here, not mid-run.

``sflsim validate`` and ``sflsim run`` call it (``run`` before any output is touched). Every
problem is a ``ScenarioError`` (or another ``UserError``): one line, the dotted key first,
exit code 2. Nothing here prints or writes. Nothing here imports torch either (except to
look for a CUDA device when ``device: cuda`` is asked for): ``sflsim validate`` stays fast.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from simulator.errors import DatasetNotFoundError, ScenarioError, UserError
from simulator.scenario import Scenario


def preflight(scenario: Scenario) -> None:
    """Raise ScenarioError (dotted key: message) for the first thing ``scenario`` cannot run with."""
    _check_device(scenario)
    _check_data(scenario)
    _check_validation(scenario)
    _check_sizes(scenario)
    _check_eval(scenario)
    _check_model(scenario)
    _check_time(scenario)


# --------------------------------------------------------------------------------------------
# The checks, in the order a run meets them
# --------------------------------------------------------------------------------------------
def _check_device(s: Scenario) -> None:
    if s.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ScenarioError("device", "cuda was asked for but torch sees no CUDA device (use cpu or auto)")


def _check_data(s: Scenario) -> None:
    """The dataset's files exist (a given data.root is the only place looked), or its package is installed."""
    from simulator.data import DATASETS
    from simulator.data.images import Bundled

    d = s.data
    spec = DATASETS[d.dataset]
    given = d.root is not None and d.root != ""
    if given and isinstance(spec, Bundled):
        raise ScenarioError("data.root", f"{d.dataset} ships with {spec.pip_name} and reads no files; "
                                         "remove data.root (or choose a dataset read from files)")
    if given and not Path(d.root).expanduser().is_dir():
        where = Path(d.root).expanduser()
        what = "is a file, not a folder" if where.exists() else "does not exist"
        try:  # the data package's message: where it would look and how to get the files
            spec.check_files(d.root, fallbacks=False)
        except DatasetNotFoundError as e:
            raise ScenarioError("data.root", f"{where} {what}; {e}") from None
        raise ScenarioError("data.root", f"{where} {what}")  # pragma: no cover - check_files found nothing
    try:
        spec.check_files(d.root, fallbacks=not given)
    except UserError as e:
        raise ScenarioError("data.root" if given else "data.dataset", str(e)) from None


def _classes(s: Scenario) -> Optional[int]:
    """The dataset's number of classes, when its catalogue entry says."""
    from simulator.data import DATASETS

    spec = DATASETS[s.data.dataset]
    return getattr(spec, "num_classes", None) or len(getattr(spec, "label_names", ()) or ()) or None


def _validation_samples(s: Scenario) -> Optional[int]:
    """Samples ``data.validation`` holds out (None: no split, or a fraction of a size not known here)."""
    from simulator.data import DATASETS
    from simulator.data.partitions import validation_size

    v = s.data.validation
    full = getattr(DATASETS[s.data.dataset], "train_size", None)
    if v is None or (isinstance(v, float) and not full):
        return None
    return validation_size(v, full or 0)


def _check_validation(s: Scenario) -> None:
    """``data.validation`` leaves training samples and holds one of each class (the run checks
    each class against the labels it loads: ``partitions.hold_out``)."""
    from simulator.data import DATASETS

    d = s.data
    size = _validation_samples(s)
    if size is None:
        return
    full = getattr(DATASETS[d.dataset], "train_size", None)
    asked = f"{size:,} samples" + (f" ({d.validation:g} of {full:,})" if isinstance(d.validation, float) else "")
    classes = _classes(s)
    if classes is not None and size < classes:
        raise ScenarioError("data.validation", f"{asked} cannot hold one of each of the {classes} classes of "
                                               f"{d.dataset}; give at least {classes}")
    if full and size >= full:
        raise ScenarioError("data.validation", f"{asked} would leave none of the {full:,} training samples of "
                                               f"{d.dataset} for the clients; give fewer than {full:,}")
    if full and classes is not None and full - size < classes:
        raise ScenarioError("data.validation", f"{asked} would leave {full - size:,} of the {full:,} training "
                                               f"samples of {d.dataset}, fewer than its {classes} classes: some "
                                               f"class would have no training sample; give at most {full - classes:,}")


def _train_samples(s: Scenario) -> tuple[Optional[int], str]:
    """The number of training samples a run will use, when known without reading the data."""
    from simulator.data import DATASETS

    d = s.data
    full = getattr(DATASETS[d.dataset], "train_size", None)
    held = _validation_samples(s)
    if full and held is not None:
        sizes = [(full - held, f"{d.dataset} has {full - held:,} training samples after data.validation "
                               f"holds {held:,} out")]
    else:
        sizes = [(full, f"{d.dataset} has {full:,} training samples")] if full else []
    if d.train_limit is not None:
        sizes.append((d.train_limit, f"data.train_limit is {d.train_limit:,}"))
    if not sizes:
        return None, ""
    return min(sizes, key=lambda t: t[0])


def _check_sizes(s: Scenario) -> None:
    """Clients, shards and the minibatch cannot be more than the training samples."""
    n, why = _train_samples(s)
    if n is None:
        return
    d = s.data
    if d.num_clients > n:
        raise ScenarioError("data.num_clients", f"{d.num_clients:,} clients but {why}; every client needs a sample")
    if d.partition == "shards" and d.num_clients * d.shards_per_client > n:
        raise ScenarioError("data.shards_per_client", f"{d.num_clients:,} clients x {d.shards_per_client:,} shards "
                                                      f"= {d.num_clients * d.shards_per_client:,} shards but {why}")
    batch = getattr(s.algorithm, "batch_size", None)
    if batch is not None and batch > n:
        raise ScenarioError("algorithm.batch_size", f"{batch:,} is more than the training samples ({why})")


def _test_samples(s: Scenario) -> tuple[Optional[int], str]:
    """The number of samples a run will evaluate on (test or validation), when known without reading the data."""
    from simulator.data import DATASETS

    d = s.data
    if d.validation is not None:
        held = _validation_samples(s)
        return (held, f"data.validation holds {held:,}") if held is not None else (None, "")
    full = getattr(DATASETS[d.dataset], "test_size", None)
    sizes = [(full, f"the test set of {d.dataset} has {full:,} samples")] if full else []
    if d.test_limit is not None:
        sizes.append((d.test_limit, f"data.test_limit is {d.test_limit:,}"))
    if not sizes:
        return None, ""
    return min(sizes, key=lambda t: t[0])


def _check_eval(s: Scenario) -> None:
    """A number in eval.subset is at most the evaluation samples (test, or validation with
    ``data.validation``) and at least the classes (one of each).

    The runner checks the same against the evaluation set it loads (``runner.eval_subset``), for
    datasets whose size is not known here."""
    asked = s.eval.subset
    if not isinstance(asked, int):
        return  # auto or null: always possible
    n, why = _test_samples(s)
    which = "validation" if s.data.validation is not None else "test"
    if n is not None and asked > n:
        raise ScenarioError("eval.subset", f"{asked:,} is more than the {which} samples ({why}); give at most {n:,}, "
                                           f"auto, or null (the full {which} set every time)")
    classes = _classes(s)
    if classes is not None and asked < classes and (n is None or asked < n):
        raise ScenarioError("eval.subset", f"{asked:,} samples cannot hold one of each of the {classes} classes of "
                                           f"{s.data.dataset}; give at least {classes}, or null (the full {which} set)")


def _check_model(s: Scenario) -> None:
    """An image model fits the dataset's samples; a text model's files are here."""
    from models.registry import MODELS
    from simulator.data import DATASETS

    m, name = s.model, s.model.name
    if MODELS[name].kind == "text":
        _check_text_model_files(name, m.local_path)
        if s.algorithm.name == "gas":
            raise ScenarioError("algorithm.name", "gas needs a model whose server part takes only h (generated "
                                                  f"activations carry no attention mask); {name} is a text model")
        return
    shape = getattr(DATASETS[s.data.dataset], "input_shape", None)
    if shape is None:
        return
    c, h, w = shape
    try:  # arithmetic on the catalogue entry (models.specs): no torch, nothing built
        MODELS[name].check_input(shape)
    except ValueError as e:
        raise ScenarioError("model.name", f"{name} does not fit the {c}x{h}x{w} samples of {s.data.dataset} ({e})") from None


def _check_text_model_files(name: str, local_path: Optional[str]) -> None:
    """A text model's files: the checkpoint in model.local_path, else the MiniLM package (its
    tokenizer serves every random-weight model too). Nothing is loaded."""
    from models.specs import minilm_path

    if local_path is None:
        try:
            minilm_path()
        except UserError as e:
            raise ScenarioError("model.name", str(e)) from None
        return
    path = Path(local_path).expanduser()
    if not path.is_dir():
        raise ScenarioError("model.local_path", f"{path} is not a folder; give a folder holding a transformers "
                                                "checkpoint (config.json, weights, tokenizer files)")
    config = path / "config.json"
    if not config.is_file():
        raise ScenarioError("model.local_path", f"{path} has no config.json; give a folder holding a transformers "
                                                "checkpoint (config.json, weights, tokenizer files)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ScenarioError("model.local_path", f"{config} is not readable JSON ({' '.join(str(e).split())})") from None
    weights = [p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin")]
    if not weights:
        raise ScenarioError("model.local_path", f"{path} has no weights (*.safetensors or *.bin)")
    tokenizer = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    if not any((path / f).is_file() for f in tokenizer):
        raise ScenarioError("model.local_path", f"{path} has no tokenizer files (one of {', '.join(tokenizer)})")


def _check_time(s: Scenario) -> None:
    """Draw the time model: the trace CSV is read in full, every drawn speed and bandwidth checked."""
    from simulator.latency import build_time_model

    build_time_model(s.time, s.data.num_clients, s.seed)
