"""Parse arguments, load config, run, map exceptions to exit codes (CONTRACT §1)."""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import sys
import time
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence


from adapter import config as config_module
from adapter import metrics
from adapter import mappings as mappings_module
from adapter import state as state_module
from adapter import stopping
from adapter.clinical import assess
from adapter.config import Config
from adapter.errors import AdapterError, ConfigError, ExitCode
from adapter.fhir import auth, capability
from adapter.fhir import client as client_module
from adapter.fhir.client import FhirClient, RetryPolicy
from adapter.fhir.throttle import TokenBucket
from adapter.outputs import report
from adapter.pipeline import ReviewSink, Run, ServerSink, Summary, Window
from adapter.sources import bulk as bulk_source
from adapter.state import State
from adapter.writeback import Output

log = logging.getLogger("adapter")


def console() -> int:
    """The console script and `python -m adapter`."""
    # What the imports built (fhir.resources' models, pydantic's validators: most of the process's objects)
    # lives as long as the process, yet every full collection walked all of it again: frozen, the garbage
    # collector's share of a 10,000-count run falls from about 0.09 to 0.04 s. Not in main(): tests call
    # main() many times in one process, and what a freeze holds is never collected.
    gc.freeze()
    # A young collection every 700 new containers (the default) runs 15 times while one page of 1,000
    # Observations is parsed (10,500 dicts and lists) and again and again while it is graded and planned,
    # each time walking objects that live as long as their batch anyway: 2,746 collections and about 0.7 s
    # of a 100,000-count run. What we build is acyclic and freed by reference counting; the few cycles
    # (tracebacks, threads) wait for 50,000 new containers instead, a few MB at most: 3 collections and
    # 0.08 s for the same run, none at 10,000 counts.
    gc.set_threshold(_YOUNG_COLLECTION_EVERY, *gc.get_threshold()[1:])
    return main()


_YOUNG_COLLECTION_EVERY = 50_000


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    run_id = uuid.uuid4().hex[:12]
    from adapter import logs

    logs.setup(args.log_format, args.log_level, run_id)
    try:
        return int(args.handler(args, run_id))
    except AdapterError as exc:
        log.error(str(exc), extra={"event": "error", "error_type": type(exc).__name__,
                                   "exit_code": int(exc.exit_code)})
        return int(exc.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside a run (a run stops at a safe point instead): every change
        # to state is one SQLite transaction, so whatever was under way rolled back.
        log.warning("interrupted", extra={"event": "interrupted", "exit_code": int(ExitCode.STOPPED)})
        return int(ExitCode.STOPPED)
    except Exception as exc:  # a bug: say what kind, never dump the data it was holding
        log.error("internal error", extra={"event": "internal-error", "error_type": type(exc).__name__},
                  exc_info=args.log_level.upper() == "DEBUG")
        return int(ExitCode.INTERNAL)


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after the command name. The copy given to each
    subcommand has no defaults of its own (SUPPRESS): otherwise its defaults would overwrite what was
    given before the command (`anc-adapter --config X run` would silently use no config)."""
    common = argparse.ArgumentParser(add_help=False)

    def option(*names: str, **kwargs: Any) -> None:
        if suppress:
            kwargs["default"] = argparse.SUPPRESS
        common.add_argument(*names, **kwargs)

    option("--config", help="TOML config (else $ANC_ADAPTER_CONFIG, else config/adapter.toml)")
    option("--fhir-url", help="FHIR base URL; overrides [fhir] base_url")
    option("--state", help="state file or postgresql:// URL; overrides [state] path and url")
    option("--log-format", choices=("json", "text"), help="default: json unless stderr is a TTY")
    option("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    option("--metrics-file", help="write Prometheus text metrics here at the end of a run")
    return common


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anc-adapter", description=__doc__, parents=[_common_options(False)])
    parser.add_argument("--version", action="version", version=f"anc-adapter {_version()}")
    common = _common_options(True)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", parents=[common], help="one incremental pass (for cron)")
    run.add_argument("--dry-run", action="store_true", help="read and classify; print what would be written")
    run.add_argument("--since", type=_instant, help="backfill window start (ISO 8601); keeps the watermark")
    run.add_argument("--until", type=_instant, help="backfill window end (ISO 8601)")
    run.add_argument("--max-duration", type=float, metavar="SECONDS",
                     help="stop cleanly (state committed) after this long, before the next cron tick")
    run.add_argument("--review-state", metavar="PATH",
                     help="with --dry-run: where to keep the review copy for `report` "
                          "(default: <state>.review.sqlite3 beside the state)")
    run.add_argument("--bulk", action="store_true",
                     help="backfill through the server's Bulk Data $export (with --since: changed since then)")
    run.set_defaults(handler=_cmd_run)

    review = commands.add_parser("report", parents=[common], help="self-contained HTML review (patient data)")
    review.add_argument("--html", required=True, metavar="FILE", help="write the report here (mode 0600)")
    review.add_argument("--since", type=_instant, help="counts and runs from this time (ISO 8601)")
    review.add_argument("--until", type=_instant, help="counts and runs before this time (ISO 8601)")
    review.add_argument("--dry-run", action="store_true",
                        help="report the last `run --dry-run` (its review state) instead of the live state")
    review.set_defaults(handler=_cmd_report)

    check = commands.add_parser("check", parents=[common], help="config, reachability, auth, capabilities")
    check.set_defaults(handler=_cmd_check)

    status = commands.add_parser("status", parents=[common], help="watermark, last runs, quarantine")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_cmd_status)

    quarantine = commands.add_parser("quarantine", parents=[common], help="work the quarantine by hand")
    quarantine.add_argument("action", choices=("list", "retry", "discard"))
    quarantine.add_argument("ids", nargs="*", metavar="ID")
    quarantine.set_defaults(handler=_cmd_quarantine)

    state = commands.add_parser("state", parents=[common], help="the state file itself")
    state_actions = state.add_subparsers(dest="state_action", required=True)
    backup = state_actions.add_parser("backup", parents=[common],
                                      help="a consistent copy of the state, safe while a run goes on")
    backup.add_argument("path", metavar="PATH", help="where the copy goes (a new file, mode 0600)")
    backup.add_argument("--force", action="store_true", help="replace PATH if it already exists")
    backup.set_defaults(handler=_cmd_state_backup)

    demo = commands.add_parser("demo", parents=[common], help="one run against a local server with samples")
    demo.set_defaults(handler=_cmd_demo)

    serve = commands.add_parser("serve", parents=[common], help="the CDS Hooks service (long-running)")
    serve.add_argument("--host", help="listen address; overrides [serve] host")
    serve.add_argument("--port", type=int, help="listen port; overrides [serve] port")
    serve.set_defaults(handler=_cmd_serve)

    show = commands.add_parser("config", parents=[common], help="print the effective config")
    show.add_argument("--show", action="store_true", required=True)
    show.set_defaults(handler=_cmd_config)
    return parser


def _version() -> str:
    # The installed distribution's version, so a support ticket names what actually runs.
    try:
        return metadata.version("anc-adapter")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _instant(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date-time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _config(args: argparse.Namespace) -> Config:
    loaded = config_module.load(config_module.resolve_path(args.config))
    return loaded.with_overrides(
        fhir={"base_url": args.fhir_url} if args.fhir_url else {},
        state=_state_override(args.state),
    )


def _state_override(given: str | None) -> dict[str, str]:
    """--state names the state outright: a URL replaces [state] path, a path replaces [state] url."""
    if not given:
        return {}
    if state_module.state_pg.is_url(given):
        return {"url": given, "path": config_module.StateConfig.path}
    return {"path": given, "url": ""}


def _client(config: Config, stop: stopping.Stop | None = None) -> FhirClient:
    if not config.fhir.base_url:
        raise ConfigError("fhir.base_url: not set; give it in the config or with --fhir-url")
    verify = config.fhir.verify
    if isinstance(verify, str) and not (verify and Path(verify).exists()):
        # requests reads "" as "do not verify": only an existing CA bundle file or directory may stand here.
        raise ConfigError(f"fhir.verify: {verify!r} is not true, false or an existing CA bundle path")
    for key in ("client_cert", "client_key"):
        path = getattr(config.fhir, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"fhir.{key}: {path} does not exist or is not a file")
    if config.fhir.client_key and not config.fhir.client_cert:
        raise ConfigError("fhir.client_key: given without fhir.client_cert")
    cert = (config.fhir.client_cert, config.fhir.client_key) if config.fhir.client_key \
        else config.fhir.client_cert or None
    # The token endpoint usually sits behind the same hospital CA (and gateway) as the FHIR server;
    # it gets its own session so the FHIR auth never rides along to it.
    session, token_http = client_module.session(verify, cert), client_module.session(verify, cert)
    session.auth = auth.build(config.auth, config.fhir.base_url, token_http, config.fhir.timeout_s)
    retry = RetryPolicy(attempts=config.fhir.retries + 1, budget_s=config.fhir.retry_budget_s)
    rate = config.fhir.max_requests_per_s
    return FhirClient(config.fhir.base_url, session, timeout_s=config.fhir.timeout_s,
                      max_pages=config.fhir.max_pages, retry=retry, limit=TokenBucket(rate) if rate else None,
                      stop=stop)


def _cmd_run(args: argparse.Namespace, run_id: str) -> int:
    config = _config(args)
    if args.until and not args.since:
        raise ConfigError("--until needs --since")
    if args.review_state and not args.dry_run:
        raise ConfigError("--review-state: only with --dry-run")
    if args.bulk and args.until:
        raise ConfigError("--until: not available with --bulk ($export selects by --since only)")
    with stopping.on_signals() as stop:
        code, _ = run_once(config, state_module.where(config.state), run_id, dry_run=args.dry_run,
                           window=Window(args.since, args.until), max_duration_s=args.max_duration,
                           metrics_file=args.metrics_file, stop=stop, bulk=args.bulk,
                           review_path=Path(args.review_state) if args.review_state else None)
    return code


def review_state_path(state_path: Path | str) -> Path:
    """Where `run --dry-run` keeps its review copy by default: beside the live state, same directory
    (and so the same protection), e.g. state.sqlite3 -> state.review.sqlite3. A PostgreSQL state has no
    folder beside it (and its pods often no disk): the review file must then be named."""
    if state_module.state_pg.is_url(state_path):
        raise ConfigError("--review-state: the state is in PostgreSQL; name the review file for the dry run "
                          "and the report with --review-state PATH")
    state_path = Path(state_path)
    return state_path.with_name(f"{state_path.stem}.review{state_path.suffix}")


def run_once(config: Config, state_path: Path | str, run_id: str, dry_run: bool = False,
             window: Window = Window(), max_duration_s: float | None = None,
             collect_rows: bool = False, out: Any = None,
             metrics_file: str | None = None,
             retry_only: tuple[str, ...] | None = None,
             review_path: Path | None = None, stop: stopping.Stop | None = None,
             bulk: bool = False) -> tuple[int, Summary | None]:
    """One pass; `retry_only` grades quarantined Observations again (those ids, or all for ()) without
    searching and without moving the watermark; `bulk` reads through $export, never moving it either. A
    dry run works on a review copy of the state (`review_path`, default beside the state) and leaves it
    there for `report`: the live state's ledger, watermark and run history stay as they were. `stop` set
    (by a signal) ends it at a safe point: exit 6."""
    mappings = mappings_module.load(config.mappings.path)
    client = _client(config, stop)
    with state_module.locked(state_path):
        state = State.open(state_path)
        if dry_run:
            started = _now()
            if review_path is None and state_module.state_pg.is_url(state_path):
                # No folder beside a PostgreSQL state (and often no disk in its pod): the dry run works in
                # memory, as `run --dry-run` always may; `--review-state PATH` keeps it for `report`.
                log.info("dry run in memory: give --review-state PATH to keep it for `report`",
                         extra={"event": "dry-run-not-kept"})
            else:
                review_path = review_path or review_state_path(state_path)
            work_state = state.review_copy(review_path, run_id, started,
                                           window.since.isoformat() if window.since else None,
                                           window.until.isoformat() if window.until else None)
            work_state.start_run(run_id, started, "dry-run")
        else:
            work_state = state
            state.start_run(run_id, _now(), "bulk" if bulk else "backfill" if window.backfill else "live")

        def finish(exit_code: int, summary: dict[str, Any]) -> None:
            work_state.finish_run(run_id, _now(), exit_code, summary)
            if metrics_file:
                metrics.write(Path(metrics_file), state, summary, exit_code, dict(client.requests_by_status))

        run: Run | None = None
        try:
            output = _output(config, client, work_state)
            sink: Any = ReviewSink(work_state, run_id, _now) if dry_run \
                else ServerSink(client, output, config.fhir.max_bundle_entries)
            progress = _Progress() if (window.backfill or bulk) and sys.stderr.isatty() else None
            run = Run(config, mappings, client, work_state, sink, output, max_duration_s=max_duration_s,
                      collect_rows=collect_rows, on_page=progress, stop=stop)
            if retry_only is not None:
                summary = run.retry_quarantine(retry_only)
            elif bulk:
                summary = bulk_source.backfill(run, client, window.since, config.fhir.page_size, max_duration_s,
                                               sleep=stop.wait if stop is not None else time.sleep)
            else:
                summary = run.execute(window)
            if progress:
                progress.done()
        except Exception as exc:
            code = exc.exit_code if isinstance(exc, AdapterError) else ExitCode.INTERNAL
            summary_so_far = run.summary.as_dict() if run else {}
            finish(int(code), summary_so_far)
            log.info("run summary", extra={"event": "run-summary", "dry_run": dry_run, "exit_code": int(code),
                                           "summary": summary_so_far})
            raise
        if dry_run:
            for planned in sink.planned:
                (out or sys.stdout).write(json.dumps(planned.resource, ensure_ascii=False) + "\n")
        # Exit 0 promises every observation was written or quarantined with a reason: refused writes are
        # kept and retried, but they are neither, so the run says so with exit 3.
        code = ExitCode.UNREACHABLE if summary.write_failures else ExitCode.OK
        if summary.stopped:
            code = ExitCode.STOPPED
        finish(int(code), summary.as_dict())
        log.info("run summary", extra={"event": "run-summary", "dry_run": dry_run, "exit_code": int(code),
                                       "summary": summary.as_dict()})
        if code != ExitCode.OK:
            log.error("the server refused some patients' writes; they are kept and retried every run",
                      extra={"event": "writes-refused", "patients": summary.write_failures})
        return int(code), summary


class _Progress:
    """A one-line progress bar on a TTY for long --since backfills (counts only, no patient data)."""

    def __init__(self, width: int = 30):
        self.width = width

    def __call__(self, summary: Summary, total: int | None) -> None:
        read = summary.observations_read
        if total:
            filled = min(self.width, self.width * read // max(total, 1))
            bar = f"[{'#' * filled}{'.' * (self.width - filled)}] {read}/{total}"
        else:
            bar = f"{read} read"
        sys.stderr.write(f"\r{bar} observations, {summary.pages} pages, {summary.quarantined} quarantined ")
        sys.stderr.flush()

    def done(self) -> None:
        sys.stderr.write("\n")


def _output(config: Config, client: FhirClient, state: State) -> Output:
    """What we write and how. The write mode per resource type comes from the server's /metadata the
    first time and is then pinned in state: a mode that changed between runs (an upgrade, another node
    behind the gateway) would create a second copy of every resource written the other way."""
    statement = client.get("metadata")
    bundle_type = capability.bundle_type(statement)
    if config.output.provenance and bundle_type != "transaction":
        # A Provenance must name the resource it is about; inside a batch a new resource's id is unknown.
        raise ConfigError("output.provenance: needs a server with transactions; this one offers only batch")
    modes = {}
    for kind, offered in capability.write_modes(statement, config.output.resources).items():
        modes[kind] = state.pinned(f"write_mode:{kind}", offered)
        if modes[kind] != offered:
            log.warning("the server now advertises another write mode; keeping the one in use",
                        extra={"event": "write-mode-pinned", "resource_type": kind, "pinned": modes[kind],
                               "offered": offered})
    return Output(system_base=config.output.system_base.rstrip("/"), profile=config.classify.profile,
                  resources=config.output.resources,
                  risk_assessment_for_normal=config.output.risk_assessment_for_normal,
                  write_modes=tuple(sorted(modes.items())), bundle_type=bundle_type,
                  provenance=config.output.provenance)


def _cmd_report(args: argparse.Namespace, run_id: str) -> int:
    config = _config(args)
    if args.until and args.since and args.until <= args.since:
        raise ConfigError("--until: must be later than --since")
    if config.state.url:
        # The report reads one SQLite file read-only and lock-free; a PostgreSQL state is reviewed through
        # the file a dry run leaves (its live state, for now, only through that).
        raise ConfigError("report: the state is in PostgreSQL; write a review file with `run --dry-run "
                          "--review-state PATH`, then `report --state PATH --html FILE`")
    live, review = Path(config.state.path), review_state_path(Path(config.state.path))
    if args.dry_run and not review.is_file():
        raise ConfigError(f"report --dry-run: no review state at {review}; run `anc-adapter run --dry-run` first")
    path = review if args.dry_run or (review.is_file() and not _has_live_runs(live)) else live
    target = Path(args.html)
    data = write_report(config, path, target, args.since, args.until)
    if path == live and review.is_file():
        log.warning("this report shows the live state; a dry-run review exists: `report --dry-run` shows it",
                    extra={"event": "report-review-exists"})
    sys.stdout.write(f"wrote {target} from the {'dry-run review' if data.review else 'live'} state {path}: "
                     f"{len(data.flagged)} flagged patients. It holds patient data (mode 0600): keep it like "
                     f"the patient record.\nOpen it in a browser: file://{target.resolve()}\n")
    return 0


def write_report(config: Config, state_path: Path, target: Path, since: datetime | None = None,
                 until: datetime | None = None) -> report.ReportData:
    """Read one state file (read-only) and write its HTML review to `target` (0600). The counts and the
    clinical context stored for them are assessed with the rules `run` uses, so the timelines show the
    grades, febrile episodes and context marks behind the Flags."""
    mappings = mappings_module.load(config.mappings.path)
    state = State.open_readonly(state_path)
    try:
        data = report.collect(state, str(state_path), mappings.thresholds, since=since, until=until,
                              default_lln=config.classify.default_lln,
                              rules=assess.Rules.from_config(config, mappings))
    finally:
        state.db.close()
    document = report.render(data, generated=datetime.now(timezone.utc), context=report.context_marks(data))
    report.write(target, document)
    return data


def _has_live_runs(path: Path) -> bool:
    """Has the adapter ever run for real on this state? Before go-live it has not, and `report` after
    `run --dry-run` then shows the dry run (CONTRACT §9), as there is nothing else to show."""
    if not path.is_file():
        return False
    state = State.open_readonly(path)
    try:
        return any(r["mode"] != "dry-run" for r in state.runs())
    finally:
        state.db.close()


def _cmd_check(args: argparse.Namespace, run_id: str) -> int:
    config = _config(args)
    mappings = mappings_module.load(config.mappings.path)
    codes = mappings.anc_codes + (tuple(sorted(mappings.input_kinds())) if config.classify.derive else ())
    report = capability.check(_client(config), config, codes)
    sys.stdout.write(report.render())
    return int(report.exit_code)


def _cmd_status(args: argparse.Namespace, run_id: str) -> int:
    config = _config(args)
    path = state_module.where(config.state)
    if isinstance(path, Path) and not path.exists():
        raise ConfigError(f"state.path: {path} does not exist yet (no run has used it)")
    state = State.open(path)
    watermark = state.watermark()
    age_s = None
    if watermark:
        age_s = round((datetime.now(timezone.utc) - datetime.fromisoformat(watermark)).total_seconds())
    resume = state.resume_point()
    report = {
        "watermark": watermark,
        "watermark_age_s": age_s,
        "resume_point": vars(resume) if resume else None,
        "observations": state.counts_by_outcome(),
        "written": state.written_counts(),
        "last_runs": state.last_runs(10),
        "quarantine": [vars(q) for q in state.quarantined()],
        "write_failures": state.write_failures(),
    }
    if args.json or not sys.stdout.isatty():
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    out = sys.stdout
    out.write(f"watermark: {watermark or '-'} (age {age_s if age_s is not None else '-'} s)\n")
    if resume:
        out.write(f"resume point: {resume.resume_at} (a pass stopped early; {resume.runs} run(s) so far,"
                  f" begun {resume.started}): the next run goes on from there\n")
    out.write(f"observations: {report['observations']}\nwritten: {report['written']}\n\nlast runs:\n")
    for r in report["last_runs"]:
        s = r["summary"] or {}
        out.write(f"  {r['started']}  {r['mode']:<8} exit={r['exit_code']}  read={s.get('observations_read')}"
                  f" quarantined={s.get('quarantined')} created={s.get('created')} updated={s.get('updated')}\n")
    if report["write_failures"]:
        out.write(f"\nwrites the server refused ({len(report['write_failures'])}), retried every run:\n")
        for f in report["write_failures"]:
            out.write(f"  Patient/{f['patient_id']}  {f['reason']}  since {f['first_seen']}\n")
    out.write(f"\nquarantine ({len(report['quarantine'])}):\n")
    for q in report["quarantine"]:
        out.write(f"  Observation/{q['observation_id']} v{q['version']}  {q['reason']}  {q['detail']}"
                  f"  first seen {q['first_seen']}\n")
    return 0


def _cmd_quarantine(args: argparse.Namespace, run_id: str) -> int:
    config = _config(args)
    path = state_module.where(config.state)
    if args.action == "retry":
        with stopping.on_signals() as stop:
            code, _ = run_once(config, path, run_id, retry_only=tuple(args.ids), stop=stop)
        return code
    with state_module.locked(path):
        state = State.open(path)
        if args.action == "list":
            entries = state.quarantined(args.ids or None)
            for q in entries:
                sys.stdout.write(json.dumps(vars(q)) + "\n")
            return 0
        if not args.ids:
            raise ConfigError("quarantine discard: name the Observation ids to discard")
        with state.transaction():
            missing = [i for i in args.ids if not state.discard_quarantined(i, _now())]
        if missing:
            raise ConfigError(f"quarantine discard: not quarantined: {', '.join(missing)}")
        return 0


def _cmd_state_backup(args: argparse.Namespace, run_id: str) -> int:
    # Not under the run lock: the copy reads a committed snapshot through its own connection, so a
    # backup from cron never makes a run exit 5, nor waits for one.
    config = _config(args)
    size = state_module.backup(str(state_module.where(config.state)), Path(args.path), replace=args.force)
    log.info("state backed up", extra={"event": "state-backup", "bytes": size})
    sys.stdout.write(f"state copied to {args.path} ({size} bytes, integrity ok)\n")
    return 0


def _cmd_demo(args: argparse.Namespace, run_id: str) -> int:
    from adapter import demo

    base = config_module.load(None)

    def run_demo(base_url: str, state_path: Path, dry_run: bool = False,
                 since: datetime | None = None) -> tuple[int, Summary | None]:
        config = base.with_overrides(fhir={"base_url": base_url}, state={"path": str(state_path)})
        return run_once(config, state_path, f"{run_id}-{uuid.uuid4().hex[:4]}", collect_rows=True,
                        dry_run=dry_run, window=Window(since), out=io.StringIO())

    def report_demo(state_path: Path, target: Path) -> int:
        return len(write_report(base, review_state_path(state_path), target).flagged)

    return demo.main(sys.stdout, run_demo, base.output.system_base.rstrip("/") + "/tag", report_demo)


def _cmd_serve(args: argparse.Namespace, run_id: str) -> int:
    from adapter import serve

    config = _config(args)
    overrides = {"host": args.host, "port": args.port}
    config = config.with_overrides(serve={k: v for k, v in overrides.items() if v is not None})
    return serve.serve(config, mappings_module.load(config.mappings.path))


def _cmd_config(args: argparse.Namespace, run_id: str) -> int:
    config = _config(args)
    sys.stdout.write(json.dumps(config_module.as_dict(config), indent=2) + "\n")
    return 0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


if __name__ == "__main__":
    sys.exit(main())
