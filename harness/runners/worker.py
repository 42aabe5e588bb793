"""The isolated worker's side (``python -m harness.runners.worker FD``): load one segmenter, then segment the
cases the native runner sends, over the socket ``FD``, until told to stop or the socket closes.

Messages (pickled, :class:`multiprocessing.connection.Connection`): the driver sends ``("load", model,
LoadOptions)``, answered ``("ready", describe())`` or ``("failed", text)``; then ``("segment", Case)``,
answered ``("ok", segs, seconds, peak_rss_mb, memory_method)`` or ``("error", type_name, message)``;
``("stop",)`` ends it. The segmenter is found among the installed plugins (entry points, and
``HARNESS_LOAD_PLUGINS`` as in the driver) and loaded with the driver's :class:`~harness.plugin_api.LoadOptions`;
the segmentation is timed here, as the native runner times it (:func:`harness.runners.case.timed_segment`).
Anything a segmenter raises, ``SystemExit`` included, is answered as an error; what cannot be answered
(``os._exit``, a crash, a kill) ends this process, and the driver sees the exit status.
"""
from __future__ import annotations

import sys
from multiprocessing.connection import Connection


def _send_error(conn: Connection, kind: str, exc: BaseException) -> None:
    if kind == "failed":
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
    else:
        conn.send(("error", type(exc).__name__, str(exc)))


def serve(conn: Connection) -> int:
    from harness.pluginmanager import HarnessPlugins
    from harness.profiling import pin_threads
    from harness.runners.case import timed_segment

    _, model, options = conn.recv()
    try:
        if options.threads:
            pin_threads(options.threads)  # as the driver does before a native load
        segmenter = HarnessPlugins().get(model).load(options)
        if options.threads:
            pin_threads(options.threads)  # after load: a segmenter that imported torch has pinned it too
        described = segmenter.describe()
    except BaseException as exc:  # noqa: BLE001 - SystemExit in a loader is a failed load too
        _send_error(conn, "failed", exc)
        return 0
    conn.send(("ready", described))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return 0
        if message[0] != "segment":
            return 0
        try:
            segs, seconds, peak = timed_segment(segmenter, message[1])
        except BaseException as exc:  # noqa: BLE001 - SystemExit and MemoryError are answers, not our exit
            _send_error(conn, "error", exc)
            del exc  # with its traceback's frames, which may hold large arrays
            continue
        try:
            conn.send(("ok", segs, seconds, peak.mb, peak.method))
        except Exception as exc:  # noqa: BLE001 - segs that cannot be pickled
            conn.send(("error", type(exc).__name__, f"the segmentation could not be sent to the driver: {exc}"))
        del segs


def main(argv: list[str]) -> int:
    conn = Connection(int(argv[0]))
    try:
        return serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
