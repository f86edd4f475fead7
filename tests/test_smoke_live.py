from tests.live import LiveNamek


def test_a_created_sandbox_becomes_ready_and_delete_stops_it(live_namek: LiveNamek) -> None:
    sandbox = live_namek.create_sandbox(name="smoke")
    assert sandbox["phase"] == "ready"
    assert live_namek.sandbox_dir(sandbox["id"]).exists()
    stopped = live_namek.delete_sandbox(sandbox["id"])
    assert stopped["phase"] == "stopped"
    assert not live_namek.sandbox_dir(sandbox["id"]).exists()
