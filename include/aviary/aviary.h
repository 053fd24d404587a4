// Umbrella header: everything an application needs to load, run and inspect models.
#pragma once

#include "aviary/build_info.h"
#include "aviary/core/config.h"
#include "aviary/core/error.h"
#include "aviary/infer/chat.h"
#include "aviary/infer/generator.h"
#include "aviary/infer/language_model.h"
#include "aviary/infer/sampling.h"
#include "aviary/infer/task_eval.h"
#include "aviary/models/aquila.h"
#include "aviary/models/aquila_config.h"
#include "aviary/models/lora_adapter.h"
#include "aviary/tokenizer/chat_template.h"
#include "aviary/tokenizer/tokenizer.h"
