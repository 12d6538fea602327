"""PlatformIO extra script: custom targets that hand the work to microfed's tools.

Loaded by platformio.ini (`extra_scripts = post:tools/platformio_extra.py`) inside PlatformIO's
SCons environment, which injects `Import` and `env`. PlatformIO has no MicroPython framework, so
these targets do not depend on a build:

    pio run -e esp32 -t microfed_flash    microfed flash  (MicroPython image from [microfed] image_dir)
    pio run -e esp32 -t microfed_deploy   microfed deploy (shared/ + firmware/ + node bundle)
    pio run -e esp32 -t microfed_repl     mpremote REPL on the board's port

`microfed` and `mpremote` are taken from PATH: activate the project's virtualenv first.
"""

import os
import subprocess

Import("env")  # noqa: F821  (SCons builtin)
env = env  # noqa: F821  (injected by SCons; bound here once for readers and linters)

BOARD = env.GetProjectOption("custom_microfed_board")
IMAGE = os.path.join(
    env.GetProjectConfig().get("microfed", "image_dir"),
    env.GetProjectOption("custom_micropython_image"),
)


def _port(scons_env: object) -> str:
    if not scons_env.subst("$UPLOAD_PORT"):
        scons_env.AutodetectUploadPort()
    return scons_env.subst("$UPLOAD_PORT")


def _runner(make_argv: object) -> object:
    def action(target: object, source: object, env: object) -> int:
        argv = make_argv(_port(env))
        print(" ".join(argv))
        return subprocess.call(argv)

    return action


env.AddCustomTarget(
    name="microfed_flash",
    dependencies=None,
    actions=[_runner(lambda port: ["microfed", "flash", "--port", port, "--board", BOARD, IMAGE])],
    title="microfed flash",
    description="Flash the MicroPython image (chip checked against the board profile)",
)
env.AddCustomTarget(
    name="microfed_deploy",
    dependencies=None,
    actions=[_runner(lambda port: ["microfed", "deploy", "--port", port, "--board", BOARD])],
    title="microfed deploy",
    description="Copy shared/, firmware/ and the node bundle over the raw REPL, verified",
)
env.AddCustomTarget(
    name="microfed_repl",
    dependencies=None,
    actions=[_runner(lambda port: ["mpremote", "connect", port, "repl"])],
    title="MicroPython REPL",
    description="Open the board's REPL with mpremote",
)
