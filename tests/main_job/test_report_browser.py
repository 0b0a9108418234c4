"""The main-job report in a real headless browser (Debian's Chromium; MUGV_CHROMIUM names it):
every <img> decodes and every <video> loads its metadata. The check itself is shown to fail on a
corrupted PNG and a truncated mp4."""

import shutil

from main_job import browser
from tests.main_job.test_main_job import quick_run


def test_every_image_and_video_of_the_report_loads_in_chromium():
    workdir, _, summary = quick_run()
    result = browser.check_report(summary["report"])
    page = open(summary["report"]).read()
    assert len(result["images"]) == page.count("<img ") >= 2 + 6 * 2 * 2
    assert len(result["videos"]) == page.count("<video ") >= 6 * 2 * 2
    assert browser.broken(result) == []
    assert all(v["duration"] > 0 and v["readyState"] >= 1 for v in result["videos"])


def test_the_browser_check_fails_on_a_broken_image_and_a_broken_video(tmp_path):
    workdir, _, summary = quick_run()
    copy = tmp_path / "report"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("dit", "vae", "encode", "data"))
    (copy / "loss_dit.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    video = copy / "sample" / "t2v_00_0.mp4"
    video.write_bytes(video.read_bytes()[:64])
    result = browser.check_report(str(copy / "report.html"))
    bad = sorted(m["src"] for kind in ("images", "videos") for m in result[kind] if not m["ok"])
    # Each element that shows one of the two broken files is reported (the sample video is on the
    # page twice: in the at-a-glance table and in its prompt's section), and nothing else.
    page = (copy / "report.html").read_text()
    assert sorted(set(bad)) == ["loss_dit.png", "sample/t2v_00_0.mp4"], bad
    assert bad.count("sample/t2v_00_0.mp4") == page.count('src="sample/t2v_00_0.mp4"') == 2, bad
