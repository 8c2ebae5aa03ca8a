"""The web page in a real browser: headless Chromium (Debian's chromium and chromium-driver,
driven by selenium) runs a text query against a live server on loopback and checks that
result cards appear with cine images that load and play; then asks for neighbours."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from browser import needs_chromium, open_chromium

pytestmark = needs_chromium
VIEWER = "http://viewer.invalid/viewer?StudyInstanceUIDs={study_uid}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_store, tmp_path_factory):
    """uvicorn serving the app on a free loopback port, in a thread."""
    import uvicorn
    from api_data import copy_api

    handle = copy_api(trained_store, tmp_path_factory.mktemp("page"), viewer_url=VIEWER)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(handle.client.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.started, "uvicorn did not start"
    while not handle.client.app.state.service.ready.is_set() and time.monotonic() < deadline:
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}", handle.read["Authorization"].removeprefix("Bearer ")
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = open_chromium(tmp_path_factory.mktemp("chromium"))
    yield driver
    driver.quit()


def test_a_query_shows_cards_with_playing_cines_and_neighbours(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, key = server
    browser.get(url + "/")
    browser.execute_script("const k = document.querySelector('#api-key'); k.value = arguments[0];"
                           "k.dispatchEvent(new Event('change'));", key)
    box = browser.find_element(By.ID, "query")
    box.send_keys("severe LV dilatation with apical thrombus")
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys("6")
    browser.find_element(By.CSS_SELECTOR, "#search-form button").click()
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card")) == 6)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card img[data-loaded='1']")) >= 12)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .prediction")) >= 6)
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    assert all(c.find_element(By.CSS_SELECTOR, ".score").text for c in cards)
    for c in cards:  # each hit links to the archive's viewer, in a new tab without an opener
        link = c.find_element(By.CSS_SELECTOR, "a.viewer")
        assert link.is_displayed() and link.get_attribute("target") == "_blank"
        assert "noopener" in link.get_attribute("rel").split()
        assert link.get_attribute("href") == VIEWER.format(study_uid=c.get_attribute("data-study-uid"))
    img = browser.find_element(By.CSS_SELECTOR, "#results .card img[data-loaded='1']")
    assert browser.execute_script("return arguments[0].naturalWidth", img) > 0
    first = img.screenshot_as_png
    time.sleep(0.35)  # a cycle of 16 frames lasts about a second: the picture must change
    assert img.screenshot_as_png != first, "the cine does not play"
    assert browser.find_element(By.ID, "status").text == ""  # no error shown
    shot = Path(os.environ.get("CMR_PAGE_SCREENSHOT", tmp_path / "search_page.png"))
    browser.save_screenshot(str(shot))

    uid = cards[0].get_attribute("data-study-uid")
    cards[0].find_element(By.CSS_SELECTOR, "button.neighbors").click()
    wait.until(lambda d: "nearest studies to" in d.find_element(By.ID, "results-title").text)
    query = browser.find_element(By.CSS_SELECTOR, "#results .card.query")
    assert query.get_attribute("data-study-uid") == uid
    wait.until(lambda d: query.find_element(By.CSS_SELECTOR, "a.viewer").is_displayed())  # the study view's link
    assert query.find_element(By.CSS_SELECTOR, "a.viewer").get_attribute("href") == VIEWER.format(study_uid=uid)
    others = [c.get_attribute("data-study-uid") for c in browser.find_elements(By.CSS_SELECTOR, "#results .card:not(.query)")]
    assert others and uid not in others


def test_each_text_hit_shows_what_its_report_says_of_the_query(server, browser):
    """The page shows, under every hit, the API's verdict per finding of the query, with the
    report's phrase: a match, a contradiction, or not stated."""
    import json
    import urllib.request

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, key = server
    query = "severe LV dilatation without LV thrombus"
    request = urllib.request.Request(url + "/search/text", json.dumps({"query": query, "k": 10, "filters": {}}).encode(),
                                     {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request) as r:
        expected = {h["study_uid"]: h["explanation"] for h in json.load(r)["hits"]}
    shown = [e["verdict"] for why in expected.values() for e in why]
    assert {"match", "contradicts"} <= set(shown), shown  # the cohort's reports give both

    browser.get(url + "/")
    browser.execute_script("const k = document.querySelector('#api-key'); k.value = arguments[0];"
                           "k.dispatchEvent(new Event('change'));", key)
    box = browser.find_element(By.ID, "query")
    box.clear()
    box.send_keys(query)
    browser.find_element(By.ID, "k").clear()
    browser.find_element(By.ID, "k").send_keys("10")
    browser.find_element(By.CSS_SELECTOR, "#search-form button").click()
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card .why .verdict")) == len(shown))
    assert "severe LV dilatation · no LV thrombus" in browser.find_element(By.ID, "understood").text
    for card in browser.find_elements(By.CSS_SELECTOR, "#results .card"):
        why = expected[card.get_attribute("data-study-uid")]
        lines = card.find_elements(By.CSS_SELECTOR, ".why .verdict")
        assert [(line.get_attribute("data-finding"), line.get_attribute("data-verdict")) for line in lines] == [
            (e["finding"], e["verdict"]) for e in why]
        for line, e in zip(lines, why):
            text = line.text
            assert text.startswith(("✓", "✗", "≈", "!", "–", "?")) and e["asked"] in text
            assert all(f"‘{phrase}’" in text for phrase in e["evidence"])
            if e["verdict"] == "contradicts":
                assert "contradicts: report says" in text
                assert line.value_of_css_property("color") == "rgba(180, 35, 24, 1)"  # the page's red
            if e["verdict"] == "match":
                mark = line.find_element(By.CSS_SELECTOR, ".mark")
                assert mark.value_of_css_property("color") == "rgba(6, 118, 71, 1)"  # green
            if e["verdict"] == "not_stated":
                assert "not stated in the report" in text
