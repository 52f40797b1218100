// Never compiled: written without the Android SDK (see android_demo/README.md).
package dev.mobileexport.demo.runtime

import ai.onnxruntime.genai.Generator
import ai.onnxruntime.genai.GeneratorParams
import ai.onnxruntime.genai.Model
import dev.mobileexport.demo.bundle.BundleFiles

/** A bundle's ONNX folder in ONNX Runtime GenAI's Android package: one generator per sequence;
 * appendTokens runs the model over the new tokens, the logits are the last token's. */
class OnnxGenAIRuntime(private val bundle: BundleFiles) : LanguageModelRuntime {
    override val name = "onnxruntime-genai"
    override val maxSeqLen: Int get() = bundle.contextLength
    private var model: Model? = null
    private var generator: Generator? = null
    private var length = 0

    override fun load() {
        model = Model(bundle.folder.absolutePath)
    }

    override fun step(tokens: IntArray, startPos: Int): FloatArray {
        val model = checkNotNull(model) { "load() first" }
        if (startPos == 0) {
            generator?.close()
            val params = GeneratorParams(model).apply {
                setSearchOption("max_length", maxSeqLen.toDouble())
                setSearchOption("do_sample", false)
            }
            generator = Generator(model, params)
            length = 0
        }
        val generator = checkNotNull(generator)
        require(startPos == length) { "ONNX Runtime GenAI appends tokens in order: step at $startPos, sequence at $length" }
        generator.appendTokens(tokens)
        length += tokens.size
        // getOutput("logits"): the last token's logits [1, 1, vocab] as a CPU tensor (GenAI 0.8+)
        val logits = generator.getOutput("logits").floatBuffer
        val all = FloatArray(logits.remaining()).also { logits.get(it) }
        val vocab = all.size  // one sequence, one position
        return all.copyOfRange(all.size - vocab, all.size)
    }

    override fun close() {
        generator?.close()
        model?.close()
        generator = null
        model = null
    }
}
