"""The dashboard in headless Chromium: sign in, watch a study sent by storescu move from received to
delivered without reloading, filter the studies list, and fix a failed delivery with the Retry button.

Screenshots land in the test's folder; with UPDATE_SCREENSHOTS=1 they also refresh
docs/images/dashboard_*.png (shown in the README).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from conftest import DOC_IMAGES, TOKEN, destination
from nodekit import make_study
from peers import free_port, storescu, wait_for

from inference.synth.dicom import Patient

pytestmark = pytest.mark.e2e

MAX_PNG_BYTES = 300_000


def shoot(page, folder: Path, name: str, *, full_page: bool = True) -> Path:
    """Screenshot `page` to folder/dashboard_<name>.png (<= 300 KB) and, when asked, into docs/images."""
    from PIL import Image

    raw = page.screenshot(full_page=full_page)
    img = Image.open(io.BytesIO(raw)).convert("RGB")
    colours = 256
    while True:
        buf = io.BytesIO()
        img.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
        if buf.tell() <= MAX_PNG_BYTES or colours <= 32:
            break
        colours //= 2
    path = folder / f"dashboard_{name}.png"
    path.write_bytes(buf.getvalue())
    assert path.stat().st_size <= MAX_PNG_BYTES, f"{path.name} is {path.stat().st_size} bytes"
    if DOC_IMAGES is not None:
        shutil.copyfile(path, DOC_IMAGES / path.name)
    return path


def images_loaded(page, count: int) -> None:
    """Wait until `count` thumbnails have loaded (the node renders them from the SC on first request)."""
    # Polled from here: the page's Content-Security-Policy forbids the eval that wait_for_function uses.
    js = (f"document.querySelectorAll('.thumbs img').length === {count} &&"
          " [...document.querySelectorAll('.thumbs img')].every(i => i.complete && i.naturalWidth > 0)")
    wait_for(lambda: page.evaluate(js), 30, what=f"{count} thumbnail(s) loaded")


def test_unauthenticated_browser_lands_on_the_sign_in_page(browser, web_node_factory) -> None:
    node = web_node_factory()
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(node.url + "/studies?state=failed")
        assert page.url.startswith(node.url + "/login?next=")
        assert page.locator("input[name=token]").is_visible()
        page.fill("input[name=token]", "not-the-token-at-all")
        page.click("button[type=submit]")
        page.wait_for_selector("text=That token is not valid.")
        response = page.goto(node.url + "/api/studies")
        assert response.status == 401
    finally:
        context.close()


def test_dashboard_follows_a_study_and_retries_a_failed_delivery(browser, web_node_factory, storescp_factory,
                                                                 tmp_path) -> None:
    from playwright.sync_api import expect

    port = free_port()
    pacs = storescp_factory(port=port)
    # stable-age completion keeps the study 'received' for 2 s, long enough to be seen in that state.
    node = web_node_factory(destinations=[destination("pacs", port)], complete_on="stable-age", stable_age_s=2.0,
                            max_attempts=2, backoff_initial_s=0.2, backoff_max_s=0.2)
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    errors: list[str] = []  # script errors and Content-Security-Policy violations
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(node.url + "/")
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        expect(page.locator("h1")).to_have_text("Overview")
        expect(page.locator("#readiness h2")).to_have_text("Ready", timeout=30_000)

        # 1. A flagged study arrives; the overview shows it without a reload, then its page follows it.
        page.evaluate("window.__notReloaded = true")
        patient = Patient(name="DOE^JANE", patient_id="PHI-1234", study_description="XR LSPINE POSTOP FLAG")
        storescu(make_study(tmp_path / "a", "brw-a", images=2, patient=patient), node.port)
        row = page.locator("table.studies tbody tr").first
        expect(row.locator(".state")).to_have_text("received", timeout=10_000)
        assert page.evaluate("window.__notReloaded") is True  # swapped in by the poller, not a navigation
        row.locator("a").first.click()
        expect(page.locator(".statusline .state")).to_have_text("received")
        page.evaluate("window.__notReloaded = true")
        expect(page.locator(".statusline .state")).to_have_text("delivered", timeout=30_000)
        assert page.evaluate("window.__notReloaded") is True
        expect(page.locator("#deliveries tbody tr")).to_have_count(7)
        expect(page.locator("table.findings tbody tr")).to_have_count(2)
        images_loaded(page, 2)
        assert "DOE" not in page.content() and "PHI-1234" not in page.content()
        shoot(page, tmp_path, "study")

        # 2. The destination goes down: the next study's deliveries fail and the page offers Retry.
        pacs.stop()
        storescu(make_study(tmp_path / "b", "brw-b", images=1), node.port)
        page.goto(node.url + "/studies?state=failed")
        expect(page.locator("table.studies tbody tr")).to_have_count(1, timeout=30_000)
        page.locator("table.studies tbody tr a").first.click()
        expect(page.locator(".statusline .state")).to_have_text("failed")
        expect(page.locator("#retry")).to_be_visible()
        expect(page.locator("#deliveries .dstate-failed")).to_have_count(4)
        images_loaded(page, 1)
        shoot(page, tmp_path, "failed")

        # 3. It comes back; Retry re-queues and the page follows the study to delivered.
        pacs = storescp_factory(port=port)
        page.click("#retry")
        expect(page.locator(".action-result")).to_contain_text("re-queued 4 delivery(ies)")
        expect(page.locator(".statusline .state")).to_have_text("delivered", timeout=30_000)
        expect(page.locator("#deliveries .dstate-delivered")).to_have_count(4)
        expect(page.locator("table.log")).to_contain_text("token:ops")
        wait_for(lambda: len(pacs.files()) == 4, 10, what="storescp to hold the 4 retried outputs")

        # 4. The studies list filtered to flagged results, the overview, destinations and models.
        page.goto(node.url + "/studies")
        page.select_option("select[name=flagged]", "true")
        page.click("form.filters button[type=submit]")
        expect(page.locator("table.studies tbody tr")).to_have_count(1)
        expect(page.locator("table.studies tbody tr .verdict")).to_have_text("finding present")
        page.select_option("select[name=flagged]", "")
        page.click("form.filters button[type=submit]")
        expect(page.locator("table.studies tbody tr")).to_have_count(2)
        shoot(page, tmp_path, "studies")
        page.goto(node.url + "/")
        expect(page.locator("#queues tbody tr")).to_have_count(1)
        expect(page.locator("#queues tbody tr td").nth(4)).to_have_text("11")  # delivered to pacs
        shoot(page, tmp_path, "overview")
        page.goto(node.url + "/destinations")
        page.click("button[data-action$='/echo']")
        expect(page.locator(".action-result")).to_contain_text("status 0x0000")
        page.goto(node.url + "/models")
        expect(page.locator("body")).to_contain_text("no model card yet")
        page.goto(node.url + "/audit")
        expect(page.locator("table.log")).to_contain_text("echo")
        assert errors == []
    finally:
        context.close()
