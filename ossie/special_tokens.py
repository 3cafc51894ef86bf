"""The o200k_harmony special tokens gpt-oss uses, defined once (ids from the published tokenizer).

Ids below STARTOFTEXT are byte-pair tokens; from it on, special tokens (the rest up to 201087 are reserved).
"""

STARTOFTEXT = 199_998  # <|startoftext|>: the first special id
ENDOFTEXT = 199_999  # <|endoftext|>: ends a raw text completion (the checkpoint's pad token)
RETURN = 200_002  # <|return|>: the final answer is done (the checkpoint's eos token)
CONSTRAIN = 200_003  # <|constrain|>
CHANNEL = 200_005  # <|channel|>
START = 200_006  # <|start|>: opens a message
END = 200_007  # <|end|>: closes a message inside the prompt
MESSAGE = 200_008  # <|message|>
CALL = 200_012  # <|call|>: the assistant calls a tool
ENDOFPROMPT = 200_018  # <|endofprompt|>

N_ORDINARY = STARTOFTEXT  # how many ids are byte-pair tokens
STOP_TOKEN_IDS = (RETURN, CALL)  # harmony generation ends at either

NAMES = {STARTOFTEXT: "<|startoftext|>", ENDOFTEXT: "<|endoftext|>", RETURN: "<|return|>",
         CONSTRAIN: "<|constrain|>", CHANNEL: "<|channel|>", START: "<|start|>", END: "<|end|>",
         MESSAGE: "<|message|>", CALL: "<|call|>", ENDOFPROMPT: "<|endofprompt|>"}
