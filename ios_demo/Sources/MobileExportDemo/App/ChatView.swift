// Never compiled: written without Xcode (see ios_demo/README.md).
import SwiftUI

/// A chat with the opened bundle: the reply streams in as it is generated, with tokens/s below.
public struct ChatView: View {
    @ObservedObject var session: ChatSession
    @State private var draft = ""

    public init(session: ChatSession) {
        self.session = session
    }

    public var body: some View {
        VStack(spacing: 0) {
            ScrollViewReader { proxy in
                ScrollView {
                    LazyVStack(alignment: .leading, spacing: 12) {
                        ForEach(session.turns) { turn in
                            TurnBubble(turn: turn).id(turn.id)
                        }
                    }
                    .padding()
                }
                .onChange(of: session.turns.last?.text) { _, _ in
                    if let last = session.turns.last?.id { proxy.scrollTo(last, anchor: .bottom) }
                }
            }
            Text(session.speed)
                .font(.footnote.monospacedDigit())
                .foregroundStyle(.secondary)
                .padding(.vertical, 4)
            HStack {
                TextField("Message", text: $draft, axis: .vertical)
                    .textFieldStyle(.roundedBorder)
                Button("Send") {
                    session.send(draft)
                    draft = ""
                }
                .disabled(!session.canChat || draft.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty)
            }
            .padding()
        }
        .navigationTitle(session.bundle?.folder.lastPathComponent ?? "Chat")
        .toolbar {
            Button("New chat") { session.newChat() }.disabled(session.busy)
        }
    }
}

/// One message, the user's on the right.
struct TurnBubble: View {
    let turn: ChatTurn

    var body: some View {
        let mine = turn.role == "user"
        HStack {
            if mine { Spacer(minLength: 40) }
            Text(turn.text.isEmpty ? "…" : turn.text)
                .textSelection(.enabled)
                .padding(10)
                .background(mine ? Color.accentColor.opacity(0.2) : Color.secondary.opacity(0.15))
                .clipShape(RoundedRectangle(cornerRadius: 12))
            if !mine { Spacer(minLength: 40) }
        }
    }
}
