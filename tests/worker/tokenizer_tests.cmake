# --- worker/tokenizer: tokenizer.json BPE/WordPiece vs the `tokenizers` library ---
# The reference tests generate their fixtures at run time with python3 from PATH
# (tests/fixtures/make_tokenizer.py, tests/worker/tokenizer/reference.py) and
# skip when `import tokenizers` fails.
if(TARGET wbroker_tokenizer)
  wb_add_gtest(tokenizer_test SOURCES worker/tokenizer_test.cc LABELS worker
               LIBS wbroker_tokenizer GTest::gmock)
endif()
