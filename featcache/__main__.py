"""``python -m featcache``: the installed ``featcache`` command, cross-stage commands (demo, predict) included.

Those live in pipeline/ (stage 1 imports no later stage), so the command is found through its
console-script entry point rather than imported here.
"""

from importlib.metadata import entry_points

(command,) = entry_points(group="console_scripts", name="featcache")
command.load()()
