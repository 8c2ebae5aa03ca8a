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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_store, tmp_path_factory):
    """uvicorn serving the app on a free loopback port, in a thread."""
    import uvicorn
    from api_data import copy_api

    handle = copy_api(trained_store, tmp_path_factory.mktemp("page"))
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
    others = [c.get_attribute("data-study-uid") for c in browser.find_elements(By.CSS_SELECTOR, "#results .card:not(.query)")]
    assert others and uid not in others
