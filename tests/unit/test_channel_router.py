"""ChannelRouter's room per channel (issue 15): the engine claims each channel's jobs by it, so
a voice/fax backlog never takes the room SMS has."""

from __future__ import annotations

from sms_milter.channels.router import ChannelRouter
from sms_milter.spool.base import Job


class Fake:
    def __init__(self, name: str, room: int, ready: bool = True):
        self.name, self.room, self.up, self.got = name, room, ready, []

    def start(self, on_result, on_receipt, on_change) -> None: ...

    def ready(self) -> bool:
        return self.up

    def capacity(self) -> int:
        return self.room - len(self.got)

    def submit(self, jobs: list[Job]) -> None:
        self.got += jobs


def _job(i: int, device: str, channel: str) -> Job:
    return Job(id=i, recipient="+41791234567", originator="SMS", text="x", parts=1, account="a",
               device=device, channel=channel)


def test_room_per_channel_and_backlog_counted_against_its_own_channel():
    sms, voice, fax = Fake("smpp", 10), Fake("voice", 2), Fake("fax", 5, ready=False)
    r = ChannelRouter({"sms": sms, "voice": voice, "fax": fax})  # type: ignore[dict-item]
    assert r.capacity_by_channel() == {"sms": 10, "voice": 2, "fax": 0}
    r.submit([_job(i, "mobile", "voice") for i in range(5)])  # 2 go out, 3 wait in the backlog
    assert len(voice.got) == 2
    assert r.capacity_by_channel() == {"sms": 10, "voice": 0, "fax": 0}  # SMS keeps all its room
    r.submit([_job(9, "sms", "sms")])
    assert [j.id for j in sms.got] == [9]
