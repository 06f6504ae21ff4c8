import pytest


@pytest.fixture(scope="session")
def train_data(datasets, tokenizer_dir):
    """A 3:1 blend of pairs and MMC4 documents, and the tokenizer that made them."""
    return [f"3:{datasets['img2dataset'][0]}", f"1:{datasets['mmc4'][0]}"], tokenizer_dir
