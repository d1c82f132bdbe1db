// wbroker runtime: the llama-family forward pass, mirroring transformers' sdpa path.
//
// Every op below corresponds to a line of transformers' modeling_llama.py
// (qwen2/mistral are the same graph): the same ops in the same order and
// dtypes give bit-identical results with the same libtorch on the same device.
// Tensor methods (a.mul(b)) stand for Python's operators: <ATen/TensorOperators.h>
// would pull in every op header and triple the compile time.
#include "wbroker/runtime/decoder_model.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/embedding.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/tensor.h>
#include <c10/core/InferenceMode.h>

#include <cmath>

namespace wbroker::runtime {

/// The weights of one decoder layer (undefined tensors for absent biases).
struct DecoderModel::Layer {
  at::Tensor q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b;      ///< attention projections
  at::Tensor gate_w, gate_b, up_w, up_b, down_w, down_b;  ///< SwiGLU MLP
  at::Tensor input_norm, post_norm;                       ///< RMSNorm weights
};

namespace {

/// LlamaRMSNorm: float32 statistics, cast back, then weight * x.
at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const auto input_dtype = x.scalar_type();
  at::Tensor h = x.to(c10::kFloat);
  at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h.mul(at::rsqrt(variance.add(eps)));
  return weight.mul(h.to(input_dtype));
}

at::Tensor RotateHalf(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({x.slice(-1, half).neg(), x.slice(-1, 0, half)}, -1);
}

at::Tensor Linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return b.defined() ? at::linear(x, w, b) : at::linear(x, w);
}

/// Looks tensors up by name and checks their shape, dtype and device.
class Binder {
 public:
  Binder(const WeightMap& weights, std::string prefix) : w_(weights), prefix_(std::move(prefix)) {}

  at::Tensor Get(const std::string& name, std::vector<int64_t> shape, bool required = true) {
    if (!status_.ok()) return {};
    auto it = w_.find(prefix_ + name);
    if (it == w_.end()) {
      if (required)
        status_ = Status(ErrorCode::kInvalidArgument, "weight '" + prefix_ + name + "' is missing");
      return {};
    }
    const at::Tensor& t = it->second;
    if (t.sizes() != c10::IntArrayRef(shape)) {
      status_ = Status(ErrorCode::kInvalidArgument,
                       "weight '" + it->first + "' has shape " + c10::str(t.sizes()) +
                           ", the config implies " + c10::str(c10::IntArrayRef(shape)));
      return {};
    }
    if (!dtype_) {
      dtype_ = t.scalar_type();
      device_ = t.device();
      if (!c10::isFloatingType(*dtype_))
        status_ =
            Status(ErrorCode::kInvalidArgument, "weight '" + it->first + "' is not floating point");
    } else if (t.scalar_type() != *dtype_ || t.device() != device_) {
      status_ = Status(ErrorCode::kInvalidArgument,
                       "weight '" + it->first + "' is " + c10::toString(t.scalar_type()) + " on " +
                           t.device().str() + ", the others " + c10::toString(*dtype_) + " on " +
                           device_.str() + " (mixed dtypes/devices are not supported)");
    }
    return t;
  }

  const Status& status() const { return status_; }
  c10::ScalarType dtype() const { return dtype_.value_or(c10::kFloat); }
  c10::Device device() const { return device_; }

 private:
  const WeightMap& w_;                    ///< all weights
  std::string prefix_;                    ///< "model." or ""
  Status status_;                         ///< first problem
  std::optional<c10::ScalarType> dtype_;  ///< dtype of the first weight
  c10::Device device_{c10::kCPU};         ///< device of the first weight
};

}  // namespace

DecoderModel::~DecoderModel() = default;

Result<std::unique_ptr<DecoderModel>> DecoderModel::Create(ModelConfig config, WeightMap weights) {
  if (!config.is_decoder())
    return Status(ErrorCode::kInvalidArgument,
                  "DecoderModel: model_type '" + config.model_type + "' is not a decoder");
  try {
    std::unique_ptr<DecoderModel> m(new DecoderModel());
    const ModelConfig& c = config;
    const std::string prefix = weights.count("model.embed_tokens.weight") ? "model." : "";
    Binder b(weights, prefix);
    const int64_t h = c.hidden_size, hd = c.head_dim;
    const int64_t q_out = c.num_attention_heads * hd, kv_out = c.num_key_value_heads * hd;
    m->embed_tokens_ = b.Get("embed_tokens.weight", {c.vocab_size, h});
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
      const std::string p = "layers." + std::to_string(i) + ".";
      Layer l;
      const bool qkv_bias = c.attention_bias;
      l.q_w = b.Get(p + "self_attn.q_proj.weight", {q_out, h});
      l.k_w = b.Get(p + "self_attn.k_proj.weight", {kv_out, h});
      l.v_w = b.Get(p + "self_attn.v_proj.weight", {kv_out, h});
      l.o_w = b.Get(p + "self_attn.o_proj.weight", {h, q_out});
      if (qkv_bias) {
        l.q_b = b.Get(p + "self_attn.q_proj.bias", {q_out});
        l.k_b = b.Get(p + "self_attn.k_proj.bias", {kv_out});
        l.v_b = b.Get(p + "self_attn.v_proj.bias", {kv_out});
      }
      if (c.o_proj_bias) l.o_b = b.Get(p + "self_attn.o_proj.bias", {h});
      l.gate_w = b.Get(p + "mlp.gate_proj.weight", {c.intermediate_size, h});
      l.up_w = b.Get(p + "mlp.up_proj.weight", {c.intermediate_size, h});
      l.down_w = b.Get(p + "mlp.down_proj.weight", {h, c.intermediate_size});
      if (c.mlp_bias) {
        l.gate_b = b.Get(p + "mlp.gate_proj.bias", {c.intermediate_size});
        l.up_b = b.Get(p + "mlp.up_proj.bias", {c.intermediate_size});
        l.down_b = b.Get(p + "mlp.down_proj.bias", {h});
      }
      l.input_norm = b.Get(p + "input_layernorm.weight", {h});
      l.post_norm = b.Get(p + "post_attention_layernorm.weight", {h});
      m->layers_.push_back(std::move(l));
    }
    m->final_norm_ = b.Get("norm.weight", {h});
    if (c.tie_word_embeddings) {
      m->lm_head_ = m->embed_tokens_;
    } else {
      Binder head(weights, "");
      m->lm_head_ = head.Get("lm_head.weight", {c.vocab_size, h}, /*required=*/false);
      if (head.status().ok() && !m->lm_head_.defined())
        return Status(ErrorCode::kInvalidArgument,
                      "weight 'lm_head.weight' is missing and tie_word_embeddings is false");
      WB_RETURN_IF_ERROR(head.status());
      if (b.status().ok() &&
          (m->lm_head_.scalar_type() != b.dtype() || m->lm_head_.device() != b.device()))
        return Status(ErrorCode::kInvalidArgument,
                      "weight 'lm_head.weight' differs in dtype/device from the others");
    }
    WB_RETURN_IF_ERROR(b.status());
    m->dtype_ = b.dtype();
    m->device_ = b.device();
    WB_ASSIGN_OR_RETURN(RotaryEmbedding rotary, RotaryEmbedding::Create(c, m->device_));
    m->rotary_ = std::make_unique<RotaryEmbedding>(std::move(rotary));
    m->config_ = std::move(config);
    m->weights_ = std::move(weights);
    return m;
  } catch (const std::exception& e) {
    return Status(ErrorCode::kInternal, std::string("DecoderModel: ") + e.what());
  }
}

KvCache DecoderModel::NewCache() const {
  KvCache cache;
  cache.keys.resize(layers_.size());
  cache.values.resize(layers_.size());
  cache.rope = rotary_->NewState();
  return cache;
}

Result<at::Tensor> DecoderModel::Forward(const std::vector<int32_t>& ids, KvCache& cache,
                                         bool all_positions) const {
  if (ids.empty()) return Status(ErrorCode::kInvalidArgument, "Forward: no input tokens");
  for (int32_t id : ids) {
    if (id < 0 || id >= config_.vocab_size)
      return Status(ErrorCode::kInvalidArgument, "token id " + std::to_string(id) +
                                                     " is outside the vocabulary (size " +
                                                     std::to_string(config_.vocab_size) + ")");
  }
  const int64_t total = cache.length + static_cast<int64_t>(ids.size());
  if (config_.sliding_window && total > *config_.sliding_window)
    return Status(ErrorCode::kUnsupported, "sequence of " + std::to_string(total) +
                                               " tokens exceeds sliding_window " +
                                               std::to_string(*config_.sliding_window) +
                                               " (sliding-window attention is not implemented)");
  if (cache.keys.size() != layers_.size())
    return Status(ErrorCode::kInvalidArgument, "Forward: cache was not made by this model");
  try {
    return ForwardOrThrow(ids, cache, all_positions);
  } catch (const std::exception& e) {
    return Status(ErrorCode::kInternal, std::string("decoder forward: ") + e.what());
  }
}

at::Tensor DecoderModel::ForwardOrThrow(const std::vector<int32_t>& ids, KvCache& cache,
                                        bool all_positions) const {
  c10::InferenceMode guard;
  const ModelConfig& c = config_;
  const int64_t n = static_cast<int64_t>(ids.size());
  const int64_t hd = c.head_dim;
  const int64_t groups = c.num_attention_heads / c.num_key_value_heads;
  const double eps = c.rms_norm_eps;
  const double scaling = std::pow(static_cast<double>(hd), -0.5);

  std::vector<int64_t> ids64(ids.begin(), ids.end());
  at::Tensor input =
      at::tensor(ids64, at::TensorOptions().dtype(c10::kLong)).view({1, n}).to(device_);
  at::Tensor hidden = at::embedding(embed_tokens_, input);
  auto [cos, sin] = rotary_->CosSin(cache.length, n, hidden.scalar_type(), cache.rope);
  cos = cos.unsqueeze(1);  // apply_rotary_pos_emb(unsqueeze_dim=1)
  sin = sin.unsqueeze(1);

  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& l = layers_[i];
    // LlamaAttention
    at::Tensor residual = hidden;
    at::Tensor x = RmsNorm(hidden, l.input_norm, eps);
    at::Tensor q = Linear(x, l.q_w, l.q_b).view({1, n, -1, hd}).transpose(1, 2);
    at::Tensor k = Linear(x, l.k_w, l.k_b).view({1, n, -1, hd}).transpose(1, 2);
    at::Tensor v = Linear(x, l.v_w, l.v_b).view({1, n, -1, hd}).transpose(1, 2);
    q = q.mul(cos).add(RotateHalf(q).mul(sin));
    k = k.mul(cos).add(RotateHalf(k).mul(sin));
    // DynamicCache.update: the first chunk is kept as is, later ones concatenated.
    if (cache.keys[i].defined()) {
      k = at::cat({cache.keys[i], k}, -2);
      v = at::cat({cache.values[i], v}, -2);
    }
    cache.keys[i] = k;
    cache.values[i] = v;
    // sdpa_attention_forward without a mask: causal for prefill, GQA in the kernel.
    at::Tensor attn = at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0,
                                                       /*is_causal=*/n > 1, scaling,
                                                       /*enable_gqa=*/groups > 1);
    attn = attn.transpose(1, 2).contiguous().reshape({1, n, -1}).contiguous();
    hidden = residual.add(Linear(attn, l.o_w, l.o_b));
    // LlamaMLP
    residual = hidden;
    x = RmsNorm(hidden, l.post_norm, eps);
    at::Tensor mlp = Linear(at::silu(Linear(x, l.gate_w, l.gate_b)).mul(Linear(x, l.up_w, l.up_b)),
                            l.down_w, l.down_b);
    hidden = residual.add(mlp);
  }
  cache.length += n;
  hidden = RmsNorm(hidden, final_norm_, eps);
  if (!all_positions) hidden = hidden.slice(1, n - 1);  // logits_to_keep=1, as generate does
  at::Tensor logits = at::linear(hidden, lm_head_).to(c10::kFloat);
  return all_positions ? logits[0] : logits[0][0];
}

}  // namespace wbroker::runtime
