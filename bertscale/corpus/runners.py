"""Which Beam runner executes the corpus stage, with which options, and how its workers get our code.

- Local: the DirectRunner in multi-processing mode (never Prism, which downloads a binary).
- Dask: Beam's `DaskRunner` (extra `apache-beam[dask]`) on a `dask.distributed` cluster named by
  `--dask_client_address`. The runner computes the graph's last transform only, so the corpus graph ends in one
  transform that depends on every branch (see `pipeline.build_graph`). Dask workers import bertscale from their
  own environment; `ship_code` uploads this checkout's package to them when they lack it.
- Dataflow, Flink, Spark (portable runners): their workers install bertscale from `--setup_file` (this source
  tree's `setup.py`), `--requirements_file`, or run an `--sdk_container_image` built from `deploy/Dockerfile`'s
  `beam-worker` target. `corpus.runner.setup_file: auto` passes the source tree's `setup.py` to a remote runner
  when none of the three is given.

Everything a user can get wrong here (a misspelt runner, an option no Beam class knows, a missing file) is a
`ConfigError` before any input is read: Beam itself would log a warning and drop an unknown option.
"""

from __future__ import annotations

import difflib
import logging
import os
import tempfile
import zipfile
from pathlib import Path

from bertscale.config import RunnerConfig
from bertscale.errors import ConfigError

log = logging.getLogger(__name__)

DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
BOUNDED_DASK_RUNNER = "bertscale.corpus.dask_runner.DaskRunner"  # Beam's, with bounded partitions
LOCAL_RUNNERS = {"DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner", "FnApiRunner"}
# Options by which a portable runner's workers get bertscale installed.
SHIPPING = ("--setup_file", "--requirements_file", "--sdk_container_image", "--extra_package",
            "--extra_packages")
DASK_PARTITIONS = 16  # bag partitions of created and shuffled data on Dask (see dask_runner.py)
SOURCE_SETUP = Path(__file__).resolve().parents[2] / "setup.py"  # present in a source checkout only


def _runner_names() -> dict[str, str]:
    """Beam's own runner lookup (a class name, case-insensitive, with or without `Runner`), plus Dask's, which
    Beam does not list among its known runners."""
    from apache_beam.options.pipeline_options import StandardOptions

    names = {path.rsplit(".", 1)[-1]: path for path in StandardOptions.ALL_KNOWN_RUNNERS}
    names["DaskRunner"] = DASK_RUNNER
    return {**{n.lower(): n for n in names}, **{n.lower().removesuffix("runner"): n for n in names}}


def canonical_runner(name: str, field: str = "corpus.runner.runner") -> str:
    """The runner's class name (`DaskRunner` for the fully qualified Dask class); ConfigError for a typo."""
    if name in (DASK_RUNNER, BOUNDED_DASK_RUNNER):
        return "DaskRunner"
    if "." in name:  # a fully qualified PipelineRunner class; Beam imports it itself
        return name
    known = _runner_names()
    if name.lower() not in known:
        close = difflib.get_close_matches(name.lower(), known, n=1)
        hint = f"did you mean {known[close[0]]}? " if close else ""
        raise ConfigError(f"{field}={name!r} is not a Beam runner: {hint}use one of "
                          f"{', '.join(sorted(set(known.values())))} or a fully qualified runner class")
    return known[name.lower()]


def check_runner_name(name: str, field: str = "corpus.runner.runner") -> None:
    """ConfigError for a runner Beam would not find (a typo), naming the closest known runner."""
    canonical_runner(name, field)


def is_dask(runner: RunnerConfig) -> bool:
    return canonical_runner(runner.runner) == "DaskRunner"


def is_remote(runner: RunnerConfig) -> bool:
    """A runner whose workers are other machines' processes (they need our code installed)."""
    return canonical_runner(runner.runner) not in LOCAL_RUNNERS


def _register_dask_options() -> None:
    try:
        import apache_beam.runners.dask.dask_runner  # noqa: F401 - defines DaskOptions (--dask_client_address...)
    except ImportError as e:
        raise ConfigError(f"the Dask runner needs the dask extra: pip install 'apache-beam[dask]' ({e})") from None


def check_pipeline_options(flags: list[str]) -> None:
    """ConfigError for options no Beam options class knows: Beam would only log a warning and drop them."""
    from apache_beam.options.pipeline_options import PipelineOptions

    malformed = [f for f in flags if not f.startswith("--") or f == "--"]
    if malformed:
        raise ConfigError(f"corpus.runner.pipeline_options {malformed} must be of the form --name=value")
    if any(f.startswith("--dask_") for f in flags):
        _register_dask_options()
    options = PipelineOptions(flags)
    beam_log = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_log.level
    beam_log.setLevel(logging.ERROR)  # Beam warns about what it drops; the ConfigError below says it better
    try:
        known = set(options.get_all_options())
    finally:
        beam_log.setLevel(level)
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - known)
    if unknown:
        hints = [f"--{u} (did you mean --{close[0]}?)" if (close := difflib.get_close_matches(u, known, n=1))
                 else f"--{u}" for u in unknown]
        raise ConfigError(f"corpus.runner.pipeline_options: unknown Beam option(s) {', '.join(hints)}; fix or "
                          "remove them (Beam would silently drop them)")
    for flag in flags:
        if flag.startswith("--runner="):
            canonical_runner(flag.split("=", 1)[1], "corpus.runner.pipeline_options --runner")


def _check_files(runner: RunnerConfig) -> None:
    for field in ("setup_file", "requirements_file"):
        value = getattr(runner, field)
        if value not in (None, "auto") and not Path(value).is_file():
            raise ConfigError(f"corpus.runner.{field}={value!r} does not exist: give the path of the file the "
                              "runner's workers install from")


def validate_runner(runner: RunnerConfig) -> None:
    """Reject a misspelt runner, an unknown pipeline option or a missing file up front."""
    canonical_runner(runner.runner)
    if is_dask(runner):
        _register_dask_options()
    check_pipeline_options(list(runner.pipeline_options))
    _check_files(runner)


def shipping_flags(runner: RunnerConfig) -> list[str]:
    """The options that install bertscale on a portable runner's workers (none for local runners and Dask,
    whose workers are handled by `ship_code`)."""
    if not is_remote(runner) or is_dask(runner):
        return []
    flags = []
    if runner.setup_file == "auto":
        given = any(f.split("=", 1)[0] in SHIPPING for f in runner.pipeline_options)
        if not (given or runner.requirements_file or runner.sdk_container_image):
            if not SOURCE_SETUP.is_file():
                raise ConfigError(
                    f"the {runner.runner} workers need bertscale installed: this installation has no source tree "
                    "setup.py, so set corpus.runner.sdk_container_image (deploy/Dockerfile, target beam-worker) "
                    "or corpus.runner.requirements_file")
            flags.append(f"--setup_file={SOURCE_SETUP}")
    elif runner.setup_file:
        flags.append(f"--setup_file={Path(runner.setup_file).resolve()}")
    if runner.requirements_file:
        flags.append(f"--requirements_file={Path(runner.requirements_file).resolve()}")
    if runner.sdk_container_image:
        flags.append(f"--sdk_container_image={runner.sdk_container_image}")
    return flags


FN_API_RUNNER = "apache_beam.runners.portability.fn_api_runner.fn_runner.FnApiRunner"


def beam_options(runner: RunnerConfig):
    """Pipeline options: the local DirectRunner in multi-processing mode (never Prism), or any runner's flags
    with what its workers need to install bertscale."""
    from apache_beam.options.pipeline_options import PipelineOptions

    name = canonical_runner(runner.runner)
    args = [f"--runner={BOUNDED_DASK_RUNNER if name == 'DaskRunner' else runner.runner}"]
    if name == "DirectRunner":
        # Beam's DirectRunner first tries Prism, downloading its binary where the network allows: name the
        # multi-processing FnApiRunner itself, so the local runner is the same with or without a network.
        args = [f"--runner={FN_API_RUNNER}"]
        workers = runner.num_workers or os.cpu_count() or 1
        args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    if name == "DaskRunner":
        _register_dask_options()
        # Beam's Dask translation puts 128 created elements in one bag partition (one task): the work units
        # would all land on one worker. A fixed number of partitions spreads them, and bounds every shuffle.
        if not any(f.startswith(("--dask_npartitions", "--dask_partition_size")) for f in runner.pipeline_options):
            args.append(f"--dask_npartitions={DASK_PARTITIONS}")
    return PipelineOptions(args + shipping_flags(runner) + list(runner.pipeline_options))


def dask_address(runner: RunnerConfig) -> str | None:
    for flag in runner.pipeline_options:
        if flag.startswith("--dask_client_address="):
            return flag.split("=", 1)[1]
    return None


def ship_code(runner: RunnerConfig) -> None:
    """Make bertscale importable on the Dask workers: a worker whose environment lacks it (or has another
    version) gets this package as a zip through Dask's own `Client.upload_file`, which puts the zip on the
    worker's `sys.path` and imports it there (also on workers that join later: it registers a worker plugin).
    The zip holds the package directory under its own name, so `import bertscale` finds it; Dask's
    `UploadDirectory` would put the package directory itself on the path, where `import bertscale` does not look,
    and reaches only workers that a nanny restarts. Portable runners ship through `shipping_flags` instead."""
    address = dask_address(runner)
    if not is_dask(runner) or address is None:
        return
    import bertscale
    from distributed import Client

    def installed_version() -> str | None:  # nested: travels by value to workers that cannot import bertscale
        try:
            import bertscale
        except ImportError:
            return None
        return getattr(bertscale, "__version__", "")

    with Client(address, timeout="30s") as client:
        versions = client.run(installed_version)
        stale = {w: v for w, v in versions.items() if v != bertscale.__version__}
        if stale:
            log.info("uploading bertscale %s to %d Dask worker(s) (%s)", bertscale.__version__, len(stale),
                     ", ".join(f"{w}: {v or 'absent'}" for w, v in sorted(stale.items())))
            with tempfile.TemporaryDirectory() as tmp:
                client.upload_file(str(package_zip(Path(tmp))))


def package_zip(directory: Path) -> Path:
    """This bertscale package as `bertscale-<version>.zip` in `directory`: its source files under `bertscale/`,
    byte-code caches left out."""
    import bertscale

    package = Path(bertscale.__file__).resolve().parent
    target = directory / f"bertscale-{bertscale.__version__}.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(package.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                z.write(path, Path("bertscale") / path.relative_to(package))
    return target

