"""The playground at / in headless Chromium (Debian's `chromium` and `chromium-driver`, driven
by selenium): a message goes out, the reply streams in, Stop cancels the request on the server.

Without Chromium the tests skip, unless ALLFORMERS_REQUIRE_BROWSER=1 (CI sets it) makes that a
failure. The slow test saves a screenshot of SmolLM2 answering, to $ALLFORMERS_SCREENSHOT when set
(docs/img/playground.png is made that way)."""
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from allformers.serve.app import Served, create_app
from allformers.serve.engine import Engine

from .serve_util import LiveServer, tiny_chat_model

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,800"]


@pytest.fixture()
def browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        chromium = None
    if not chromium or not driver:
        message = "headless Chromium is missing: apt-get install chromium chromium-driver; pip install selenium"
        if os.environ.get("ALLFORMERS_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    d = webdriver.Chrome(service=Service(driver), options=options)
    d.set_script_timeout(60)
    yield d
    d.quit()


def wait(cond, timeout=60.0):
    deadline = time.time() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.time() < deadline, "timed out waiting in the browser"
        time.sleep(0.05)


def send(d, text: str):
    from selenium.webdriver.common.by import By

    # record every length the reply passes through: proof that it streamed in
    d.execute_script("""
        window.lengths = [];
        new MutationObserver(() => {
            const b = document.querySelector('.msg.assistant:last-child .body');
            if (b) window.lengths.push(b.textContent.length);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});""")
    d.find_element(By.ID, "prompt").send_keys(text)
    d.find_element(By.ID, "send").click()


def set_slider(d, name: str, value):
    d.execute_script("const s = document.getElementById(arguments[0]); s.value = arguments[1];"
                     "s.dispatchEvent(new Event('input'));", name, str(value))


def reply(d, n: int = 1):
    """The text of the n-th reply, once it is complete."""
    from selenium.webdriver.common.by import By

    wait(lambda: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) >= n
         or d.find_elements(By.CSS_SELECTOR, ".msg.error"))
    assert not d.find_elements(By.CSS_SELECTOR, ".msg.error"), d.find_element(By.ID, "log").text
    return d.execute_script("return document.querySelectorAll('.msg.assistant .body')[arguments[0]].textContent", n - 1)


def test_playground_streams_a_reply_and_stop_cancels(browser):
    from selenium.webdriver.common.by import By

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = tiny_chat_model()
    engine = Engine(model, tok, slots=2, max_len=256)
    step = engine.step
    engine.step = lambda: (time.sleep(0.01), step())[1]  # a tiny model is too fast to watch stream
    try:
        with LiveServer(create_app([Served("tiny", model, tok, engine=engine)])) as srv:
            d = browser
            d.get(srv.url + "/")
            wait(lambda: d.find_element(By.ID, "model").get_attribute("value") == "tiny")
            set_slider(d, "temperature", 0)
            set_slider(d, "max_tokens", 60)
            send(d, "Hello there")
            text = reply(d)
            import openai

            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
            want = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                                  temperature=0, max_tokens=60, top_p=1, presence_penalty=0,
                                                  frequency_penalty=0, extra_body={"top_k": 0})
            assert text == want.choices[0].message.content and len(text) > 20
            lengths = d.execute_script("return window.lengths")
            assert len(set(lengths)) > 5, lengths  # the text grew step by step
            assert "60 tokens" in d.find_element(By.ID, "status").text
            # a long reply, stopped from the page: the server cancels it and frees the slot
            set_slider(d, "max_tokens", 120)
            send(d, "Tell me more")
            wait(lambda: engine.n_running == 1)  # the first reply is done: its bubble is .done
            time.sleep(0.3)
            d.find_element(By.ID, "stopgen").click()
            wait(lambda: d.find_element(By.ID, "status").text == "stopped")
            wait(lambda: engine.n_running == 0, timeout=10)
            assert engine.stats["finished_cancelled"] == 1
    finally:
        torch.set_num_threads(torch_threads)


@pytest.mark.slow
def test_playground_with_smollm2_and_its_screenshot(browser, tmp_path):
    import allformers
    from selenium.webdriver.common.by import By
    from allformers.zoo.assets import smollm2_gguf_path

    model = allformers.load(smollm2_gguf_path())
    engine = Engine(model, model.tokenizer, slots=4, max_len=1024)
    with LiveServer(create_app([Served("smollm2", model, model.tokenizer, engine=engine)])) as srv:
        d = browser
        d.get(srv.url + "/")
        wait(lambda: d.find_element(By.ID, "model").get_attribute("value") == "smollm2")
        set_slider(d, "temperature", 0.2)
        d.find_element(By.ID, "seed").send_keys("1")
        send(d, "What is the capital of France? Answer in one sentence.")
        text = reply(d)
        assert "Paris" in text
        assert len(set(d.execute_script("return window.lengths"))) > 3
        send(d, "Name three famous places to visit there.")
        assert len(reply(d, 2)) > 20
        d.execute_script("document.getElementById('log').scrollTop = 0")
        out = Path(os.environ.get("ALLFORMERS_SCREENSHOT", tmp_path / "playground.png"))
        out.parent.mkdir(parents=True, exist_ok=True)
        assert d.save_screenshot(str(out)) and out.stat().st_size > 10_000
