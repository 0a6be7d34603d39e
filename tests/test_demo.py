"""The main job: `labmetal demo` brings a simulated room under labmetal's control."""
import subprocess

from tests.support import LABMETAL, free_port


def test_demo_brings_every_seat_to_available_and_powered_on(tmp_path):
    listen = f"127.0.0.1:{free_port()}"
    for attempt in ("first run", "second run reuses the enrolled seats"):
        result = subprocess.run([LABMETAL, "demo", "--seats", "4", "--once", "--listen", listen,
                                 "--state-dir", str(tmp_path / "demo")],
                                capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, (attempt, result.stdout, result.stderr)
        assert "4/4 seats available and powered on." in result.stdout, attempt
