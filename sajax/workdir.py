"""The run folder (``--workdir``): its default name, the writability check, ``config.json`` and ``errors.log``.

A workdir holds one run: a second run with another config is refused before anything is written, and the
same config resumes (see :func:`sajax.config.config_differences` for the keys that may change).
"""

from __future__ import annotations

import datetime
import json
import os
import time

import ml_collections

from sajax import config as config_lib


def default_workdir(name: str = "default", root: str = "runs") -> str:
  """A fresh ``runs/<name>-<date>-<time>`` folder name (not created)."""
  base = os.path.join(root, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
  path, k = base, 1
  while os.path.exists(path):
    k += 1
    path = f"{base}-{k}"
  return path


def check_workdir_writable(workdir: str) -> None:
  """Raises ConfigError when ``workdir`` cannot be created or written; creates nothing."""
  path = os.path.abspath(workdir)
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise config_lib.ConfigError(f"workdir {workdir!r} is not writable: {probe!r} is not a directory; "
                                 "allowed: a writable directory path")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise config_lib.ConfigError(f"workdir {workdir!r} is not writable: no write permission on {probe!r}; "
                                 "allowed: a writable directory path")


def read_saved_config(path: str) -> dict:
  """The run config saved in ``path`` (a workdir's ``config.json``); raises ConfigError naming the file when it
  is not readable or not a JSON object, so a damaged one stops the run before anything is written."""
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:   # ValueError: not JSON, or not UTF-8
    problem = f"is not readable JSON ({type(e).__name__}: {' '.join(str(e).split())})"
  else:
    if isinstance(saved, dict):
      return saved
    kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(saved), "a number")
    problem = f"holds {kind}, not an object"
  raise config_lib.ConfigError(f"saved run config {path!r} {problem}; allowed: the JSON object of run settings "
                               "sajax wrote there (restore it to resume this run) or a fresh --workdir")


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Creates ``workdir`` and writes ``config.json``; a workdir holding another run's config is refused."""
  check_workdir_writable(workdir)
  values = config.to_dict()
  values["workdir"] = os.path.abspath(workdir)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    old = read_saved_config(path)
    diffs = config_lib.config_differences(old, values)
    if diffs:
      raise config_lib.ConfigError(f"workdir {workdir!r} holds a run with another config ({'; '.join(diffs)}); "
                                   "allowed: the same config to resume, or a fresh --workdir")
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(values, f, indent=2, sort_keys=True, default=list)
  os.replace(tmp, path)


ERRORS_LOG = "errors.log"


def keep_traceback(workdir: str, what: str, text: str) -> str:
  """Appends ``text`` (a traceback of ``what``, e.g. 'learner 3') to ``<workdir>/errors.log`` with the time;
  returns the file's path. The terminal gets one line per failure; this file keeps the detail."""
  path = os.path.join(workdir, ERRORS_LOG)
  stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
  with open(path, "a") as f:
    f.write(f"--- {stamp}: {what}\n{text.rstrip()}\n")
  return path
