//! dino-core: the DINO self-distillation objective for any candle model.
